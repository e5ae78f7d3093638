"""GPTQ onto every WeightGrid: the naive OBS reference, lower Hessian loss than RTN, act-order
on grids whose blocks are fixed by the format, and stacked weights that share H."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.codebooks import nf4_dequantize
from lowbit.formats.grid_base import group_params, group_slices
from lowbit.formats.grids import GRID_NAMES, get_grid
from lowbit.formats.weight import GridWeight
from lowbit.methods.gptq import gptq_quantize, layer_losses, prepare_hessian
from lowbit.methods.rtn import hessian_loss, rtn

ALL = [*GRID_NAMES, "w4g64", "w3", "w4g32-asym", "w4-tensor"]
STACKABLE = [n for n in ALL if get_grid(n).stackable]


def correlated(n: int = 1024, d: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    mix = torch.eye(d) + 0.6 * torch.randn(d, d, generator=g) / d**0.5
    x = z @ mix
    x[:, 3] *= 20  # an outlier channel
    return 2 * x.T @ x / n


def skewed(n: int = 1024, d: int = 128, seed: int = 5) -> torch.Tensor:
    """Correlated inputs whose scales span two decades: a strongly non-uniform diag(H), where
    the rounding order matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.5 * torch.randn(d, d, generator=g)
                                         / d**0.5)
    x *= torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    return 2 * x.T @ x / n


H = correlated()
W = torch.randn(16, 128, generator=torch.Generator().manual_seed(1)) * 0.02


def gptq(w: torch.Tensor, h: torch.Tensor, grid, act_order: bool = False, block_size: int = 128,
         damp: float = 0.01, static_groups: bool = False) -> GridWeight:
    return gptq_quantize(w, prepare_hessian(h, act_order, damp), grid, block_size, static_groups)


def loss_of(gw: GridWeight, w: torch.Tensor, h: torch.Tensor) -> float:
    return hessian_loss(gw.dequantize() - w, h)


def naive_grid_gptq(w: torch.Tensor, h: torch.Tensor, grid, act_order: bool, damp: float = 0.01,
                    static_groups: bool = False) -> torch.Tensor:
    """OBS-style reference in float64 for any grid: round column j (in act-order, by decreasing
    diag(H)), spread its error with row j of the explicit (H + lambda I)^-1, downdate the
    inverse to remove column j. Groups are fitted when the order reaches their first column
    (on the updated weights) where the grid allows any column set per group; otherwise (and
    for whole-row grids) all groups are fitted up front on the original weight."""
    h = h.double().clone()
    w = w.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    diag = torch.diag(h)
    hinv = torch.linalg.inv(h + damp * diag.mean() * torch.eye(h.shape[0], dtype=h.dtype))
    in_f = w.shape[1]
    order = torch.argsort(diag.float(), descending=True).tolist() if act_order else range(in_f)
    ctx = grid.prepare(w.float(), diag.float())
    gs = grid.group_size
    prefit = gs is None or (act_order and (static_groups or not grid.column_groups))
    params = grid.fit_all(w.float(), diag.float(), ctx) if prefit else None
    fitted = {}
    out = torch.zeros_like(w)
    for pos, j in enumerate(order):
        if prefit:
            p = group_params(grid, params, 0 if gs is None else j // gs)
        else:
            if pos % gs == 0:
                cols = list(order[pos : pos + gs])
                fitted[pos // gs] = grid.fit(w[:, cols].float(), diag[cols].float(), ctx=ctx,
                                             group=pos // gs)
            p = fitted[pos // gs]
        col = w[:, j : j + 1].float()
        out[:, j] = grid.decode(grid.encode(col, p), p)[:, 0].double()
        err = (w[:, j] - out[:, j]) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]
        hinv -= torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]
    return out.float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp8-e4m3", "fp8-e4m3-tensor", "fp4-g32",
                                  "mxfp4", "mxfp8-e4m3", "mxint8", "nvfp4", "sq3", "w4g32"])
def test_fast_matches_naive(name: str, act_order: bool) -> None:
    grid = get_grid(name)
    gw = gptq(W, H, grid, act_order, block_size=32)
    ref = naive_grid_gptq(W, H, grid, act_order)
    fast = gw.dequantize()
    same = torch.isclose(fast, ref, rtol=0, atol=1e-7).float().mean()
    assert same > 0.99  # float32 vs float64: a rare rounding tie may fall the other way
    assert loss_of(gw, W, H) == pytest.approx(hessian_loss(ref - W, H), rel=0.02)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["fp8-e4m3-b128", "w3g40-asym"])
def test_partial_blocks_and_odd_block_size(name: str, act_order: bool) -> None:
    """A 150x200 weight: FP8 128x128 blocks partial in both dimensions; lazy-update blocks of
    48 columns, not a multiple of the group size (rounded to one group of 40, or 128)."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1024, 200, generator=g) @ (torch.eye(200) + 0.3 * torch.randn(
        200, 200, generator=g) / 200**0.5)
    h = 2 * x.T @ x / 1024
    w = torch.randn(150, 200, generator=g) * 0.02
    grid = get_grid(name)
    gw = gptq(w, h, grid, act_order, block_size=48)
    assert (gw.g_idx is not None) == (act_order and grid.column_groups)
    ref = naive_grid_gptq(w, h, grid, act_order)
    assert torch.isclose(gw.dequantize(), ref, rtol=0, atol=1e-7).float().mean() > 0.99


@pytest.mark.parametrize("name", ALL)
def test_gptq_beats_rtn(name: str) -> None:
    grid = get_grid(name)
    gw = gptq(W, H, grid, block_size=32)
    slices = group_slices(grid, 128)
    assert gw.codes.shape == W.shape and gw.g_idx is None
    for k in grid.group_keys:
        if k in gw.params:
            assert gw.params[k].shape == (16, len(slices)), k
    decoded = torch.cat(
        [grid.decode(gw.codes[:, sl], group_params(grid, gw.params, g))
         for g, sl in enumerate(slices)],
        1,
    )
    assert torch.equal(decoded, gw.dequantize())
    w_rtn = rtn(W, grid, sensitivity=torch.diag(H)).dequantize()
    assert loss_of(gw, W, H) < 0.9 * hessian_loss(w_rtn - W, H)
    info = layer_losses(W, gw, H)
    assert info["loss"] == pytest.approx(loss_of(gw, W, H), rel=1e-6)
    sens = torch.diag(H) if grid.needs_sensitivity else None
    assert info["rtn_loss"] == pytest.approx(loss_of(rtn(W, grid, sens), W, H), rel=1e-6)


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp8-e4m3", "mxfp4", "nvfp4", "sq3", "ternary",
                                  "w4g32"])
def test_diagonal_hessian_is_rtn(name: str) -> None:
    # no correlations -> no error feedback: GPTQ rounds exactly as RTN does
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.5)
    grid = get_grid(name)
    gw = gptq(W, h, grid)
    r = rtn(W, grid, sensitivity=torch.diag(h))
    assert torch.equal(gw.codes, r.codes)
    assert torch.equal(gw.dequantize(), r.dequantize())


# ------------------------------------------------------------------------------ act-order


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "mxfp4", "mxfp4-mse", "nvfp4", "fp4-g32",
                                  "fp8-e4m3-b128", "sq3", "ternary"])
def test_act_order_on_fixed_block_grids(name: str) -> None:
    """Grids whose blocks are fixed by the format (no column groups) take act-order as static
    groups: every block fitted up front on the original weight (the same parameters as RTN),
    only the rounding order changes; no g_idx; lower loss than RTN on a skewed H."""
    grid = get_grid(name)
    assert not grid.column_groups
    h = skewed()
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(6)) * 0.02
    gw = gptq(w, h, grid, act_order=True, block_size=32)
    assert gw.g_idx is None
    r = rtn(w, grid, sensitivity=torch.diag(h))
    assert set(gw.params) == set(r.params)
    for k, v in r.params.items():
        assert torch.equal(gw.params[k], v), k
    natural = gptq(w, h, grid, act_order=False, block_size=32)
    assert not torch.equal(gw.codes, natural.codes)  # the order did change the rounding
    assert loss_of(gw, w, h) < 0.9 * loss_of(r, w, h)
    # static_groups asks for what these grids do anyway
    same = gptq(w, h, grid, act_order=True, block_size=32, static_groups=True)
    assert torch.equal(same.codes, gw.codes)


# ------------------------------------------------------------------- stacked weights, one H


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", STACKABLE)
def test_stacked_weights_split_to_each_alone(name: str, act_order: bool) -> None:
    """Rows are independent given H: two weights that share an input, rounded as one stacked
    weight and split by rows, get exactly the codes and parameters of rounding each alone."""
    grid = get_grid(name)
    hes = prepare_hessian(H, act_order)
    a = torch.randn(24, 128, generator=torch.Generator().manual_seed(7)) * 0.02
    b = torch.randn(40, 128, generator=torch.Generator().manual_seed(8)) * 0.05
    parts = gptq_quantize(torch.cat([a, b]), hes, grid, 32).split_rows([24, 40])
    for part, w in zip(parts, [a, b], strict=True):
        alone = gptq_quantize(w, hes, grid, 32)
        assert torch.equal(part.codes, alone.codes)
        assert set(part.params) == set(alone.params)
        for k, v in alone.params.items():
            assert torch.equal(part.params[k], v), k
        assert (part.g_idx is None) == (alone.g_idx is None)
        if alone.g_idx is not None:
            assert torch.equal(part.g_idx, alone.g_idx)
        assert torch.equal(part.saturated, alone.saturated)
        assert torch.equal(part.dequantize(), alone.dequantize())


# --------------------------------------------------------------------- formats and errors


def test_nf4_dq_codes_use_stored_scales() -> None:
    grid = get_grid("nf4-dq")
    gw = gptq(W, H, grid)
    assert torch.equal(nf4_dequantize(grid.stored(gw.codes, gw.params)), gw.dequantize())


def test_saturation_is_counted() -> None:
    # MX scales clip the block maximum by design; ternary clips everything beyond 1.5 gamma
    for name in ("mxfp4", "ternary"):
        gw = gptq(W, H, get_grid(name))
        assert gw.saturated.shape == (16,) and gw.n_saturated > 0, name
    # the per-tensor FP8 scale is fixed from the original weight; updates beyond it are clipped
    gw = gptq(W, H, get_grid("fp8-e4m3-tensor"))
    scale = float(gw.params["scale"][0, 0])
    assert float(gw.dequantize().abs().max()) <= scale * 448 * (1 + 1e-6)


def test_dead_columns_and_errors() -> None:
    h = H.clone()
    h[5, :] = 0
    h[:, 5] = 0
    hes = prepare_hessian(h, act_order=False)
    assert hes.dead.tolist() == [i == 5 for i in range(128)]
    gw = gptq_quantize(W, hes, get_grid("nvfp4"))
    w_hat = gw.dequantize()
    assert torch.isfinite(w_hat).all() and loss_of(gw, W, h) > 0
    assert float(w_hat[:, 5].abs().max()) == 0.0
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        gptq(bad, H, get_grid("nf4"))
    with pytest.raises(LowbitError, match="multiple of 32"):
        gptq(W[:, :48], H[:48, :48], get_grid("mxfp4"))
    with pytest.raises(LowbitError, match="Hessian of size 128 for a weight with 48 inputs"):
        gptq(W[:, :48], H, get_grid("nf4"))
