"""GPTQ onto any WeightGrid: lower Hessian loss than RTN, agreement with the integer GPTQ."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize
from lowbit.algorithms.gptq_grid import gptq_grid
from lowbit.algorithms.rtn import hessian_loss
from lowbit.errors import LowbitError
from lowbit.formats.codebooks import nf4_dequantize
from lowbit.formats.grids import GRID_NAMES, count_saturated, get_grid, group_slices, rtn
from lowbit.scheme import parse_scheme

ALL = [*GRID_NAMES, "w4g64", "w3", "w4g32-asym", "w4-tensor"]


def correlated(n: int = 1024, d: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    mix = torch.eye(d) + 0.6 * torch.randn(d, d, generator=g) / d**0.5
    x = z @ mix
    x[:, 3] *= 20  # an outlier channel
    return 2 * x.T @ x / n


H = correlated()
W = torch.randn(16, 128, generator=torch.Generator().manual_seed(1)) * 0.02


@pytest.mark.parametrize("name", ALL)
def test_gptq_beats_rtn(name: str) -> None:
    grid = get_grid(name)
    codes, params, w_hat, loss = gptq_grid(W, H, grid, block_size=32)
    assert codes.shape == W.shape and len(params) == len(group_slices(grid, 128))
    decoded = torch.cat(
        [
            grid.decode(codes[:, sl], p)
            for sl, p in zip(group_slices(grid, 128), params, strict=True)
        ],
        1,
    )
    assert torch.equal(decoded, w_hat)
    assert loss == pytest.approx(hessian_loss(w_hat - W, H), rel=1e-6)
    _, _, w_rtn = rtn(W, grid, sensitivity=torch.diag(H))
    assert loss < 0.9 * hessian_loss(w_rtn - W, H)


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp8-e4m3", "mxfp4", "nvfp4", "sq3", "ternary"])
def test_diagonal_hessian_is_rtn(name: str) -> None:
    # no correlations -> no error feedback: GPTQ rounds exactly as RTN does
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.5)
    grid = get_grid(name)
    codes, _, w_hat, _ = gptq_grid(W, h, grid)
    codes_rtn, _, w_rtn = rtn(W, grid, sensitivity=torch.diag(h))
    assert torch.equal(codes, codes_rtn)
    assert torch.equal(w_hat, w_rtn)


@pytest.mark.parametrize("name", ["w4g32", "w4", "w3g64-asym"])
def test_int_grid_matches_integer_gptq(name: str) -> None:
    codes, _, w_hat, loss = gptq_grid(W, H, get_grid(name), block_size=64, damp=0.01)
    # the grid GPTQ has no act-order: compare with the integer GPTQ in natural column order
    cfg = GPTQConfig(block_size=64, damp=0.01, act_order=False)
    qw, stats = gptq_quantize(W, H, parse_scheme(name), cfg)
    assert torch.equal(codes, qw.codes)
    assert torch.equal(w_hat, qw.dequantize())
    assert loss == pytest.approx(stats["loss"], rel=1e-6)


def test_nf4_dq_codes_use_stored_scales() -> None:
    grid = get_grid("nf4-dq")
    codes, params, w_hat, _ = gptq_grid(W, H, grid)
    assert torch.equal(nf4_dequantize(grid.stored(codes, params)), w_hat)


def test_saturation_is_counted() -> None:
    # MX scales clip the block maximum by design; ternary clips everything beyond 1.5 gamma
    for name in ("mxfp4", "ternary"):
        _, params, _, _ = gptq_grid(W, H, get_grid(name))
        assert count_saturated(params) > 0, name
    # the per-tensor FP8 scale is fixed from the original weight; updates beyond it are clipped
    _, params, w_hat, _ = gptq_grid(W, H, get_grid("fp8-e4m3-tensor"))
    assert float(w_hat.abs().max()) <= float(params[0]["scale"][0, 0]) * 448 * (1 + 1e-6)


def test_dead_columns_and_errors() -> None:
    h = H.clone()
    h[5, :] = 0
    h[:, 5] = 0
    codes, _, w_hat, loss = gptq_grid(W, h, get_grid("nvfp4"))
    assert torch.isfinite(w_hat).all() and loss > 0
    assert float(w_hat[:, 5].abs().max()) == 0.0
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        gptq_grid(bad, H, get_grid("nf4"))
    with pytest.raises(LowbitError, match="multiple of 32"):
        gptq_grid(W[:, :48], H[:48, :48], get_grid("mxfp4"))
