"""Round-to-nearest onto any grid: what ``rtn`` returns, the sensitivity it takes, the layer
loss, and the RTN recipe step."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import grouped_args, n_groups
from lowbit.formats.grids import GRID_NAMES, get_grid
from lowbit.formats.weight import GridWeight
from lowbit.methods import rtn as rtn_module
from lowbit.methods.rtn import RTN, grid_loss, hessian_loss, rtn
from lowbit.pipeline.stats import InputStats

NAMES = [*GRID_NAMES, "w4g32", "w3g64-asym", "w8", "w8-tensor", "w4g32-mse"]


def weight(rows: int = 24, cols: int = 128, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[3, 7] = 0.5  # an outlier
    return w


@pytest.mark.parametrize("name", NAMES)
def test_rtn_returns_a_grid_weight(name: str) -> None:
    grid = get_grid(name)
    w = weight()
    gw = rtn(w, grid)
    assert isinstance(gw, GridWeight) and gw.grid == grid and gw.shape == (24, 128)
    assert gw.g_idx is None
    assert gw.codes.dtype == (torch.int8 if grid.signed_codes else torch.uint8)
    assert int(gw.codes.min()) >= (-(1 << (grid.code_bits - 1)) if grid.signed_codes else 0)
    assert int(gw.codes.max()) < (1 << grid.code_bits)
    for k in grid.group_keys:
        if k in gw.params:
            assert gw.params[k].shape == (24, n_groups(grid, 128)), k
    # every element on its nearest grid point: re-encoding the weight gives the same codes
    xv, pv = grouped_args(grid, w, gw.params)
    assert torch.equal(grid.encode(xv, pv).reshape(w.shape), gw.codes)
    # clipped elements, per output row
    mask = grid.saturated(xv, pv).reshape(w.shape)
    assert gw.saturated.shape == (24,) and torch.equal(gw.saturated, mask.sum(1))
    assert gw.n_saturated == int(mask.sum())
    # the input is not modified, and any float dtype is accepted
    assert torch.equal(w, weight())
    assert torch.equal(rtn(w.double(), grid).codes, gw.codes)


def test_sensitivity_shapes() -> None:
    w = weight()
    sens = torch.rand(128, generator=torch.Generator().manual_seed(1)) ** 4
    for name in ("sq3", "w4g32-mse", "w4-tensor-mse", "mxfp4-mse"):
        grid = get_grid(name)
        a = rtn(w, grid, sens)
        b = rtn(w, grid, sens.expand(24, 128).clone())  # the same weighting given per row
        assert torch.equal(a.codes, b.codes), name
        assert not torch.equal(a.dequantize(), rtn(w, grid).dequantize()), name  # it matters
    for name in ("sq3", "w4g32-mse", "mxfp4-mse", "nf4"):
        with pytest.raises(LowbitError, match=r"sensitivity of shape \(64,\) .* give \(128,\)"):
            rtn(w, get_grid(name), torch.ones(64))


def test_hessian_loss_is_the_mean_row_quadratic_form() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 32, generator=g)
    h = 2 * x.T @ x / 256
    delta = torch.randn(5, 32, generator=g)
    by_row = [float(d @ h @ d) for d in delta]
    assert hessian_loss(delta, h) == pytest.approx(sum(by_row) / 5, rel=1e-5)
    # = 2 * mean over rows and tokens of the squared output error
    assert hessian_loss(delta, h) == pytest.approx(
        2 * float(((x @ delta.T) ** 2).sum()) / (256 * 5), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_grid_loss_by_row_blocks_equals_the_whole_loss(name: str, monkeypatch) -> None:
    w = weight(rows=40)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(4))
    h = 2 * x.T @ x / 256
    gw = rtn(w, get_grid(name))
    whole = hessian_loss(gw.dequantize() - w, h)
    monkeypatch.setattr(rtn_module, "LOSS_BLOCK", 3 * 128)  # blocks of 3 rows, the last of 1
    assert gw.row_blocks(3 * 128)[-1] == ((39, 40) if gw.grid.stackable else (0, 40))
    assert grid_loss(gw, w, h) == pytest.approx(whole, rel=1e-5)


def _stats() -> InputStats:
    stats = InputStats(128, {"hessian"})
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(3))
    x *= torch.linspace(0.1, 4, 128)
    stats.add(x)
    return stats


def test_rtn_step() -> None:
    ws = {"a": weight(16, 128, 4), "b": weight(32, 128, 5), "c": weight(8, 128, 6)}
    grids = {"a": get_grid("nf4"), "b": get_grid("sq3"), "c": get_grid("mxfp4")}
    stats = _stats()
    out = RTN(scheme="nf4").round_layers(ws, grids, stats)
    assert set(out) == set(ws)
    for name, (gw, info) in out.items():
        sens = torch.diag(stats.h) if name == "b" else None  # only SqueezeLLM uses diag(H)
        alone = rtn(ws[name], grids[name], sens)
        assert torch.equal(gw.codes, alone.codes) and torch.equal(gw.dequantize(),
                                                                  alone.dequantize())
        assert info["saturated"] == alone.n_saturated and info["seconds"] >= 0
    # no statistics needed unless a grid needs the Hessian diagonal
    assert not RTN(scheme="nf4").needs_data() and RTN(scheme="sq3").needs_data()
    assert RTN(scheme="nf4", overrides={"re:.*down": "sq4"}).needs_data()
    assert RTN().wants(get_grid("sq4")) == {"hessian"} and not RTN().wants(get_grid("w4g64"))
    plain = RTN(scheme="nf4").round_layers({"a": ws["a"]}, {"a": grids["a"]}, None)
    assert torch.equal(plain["a"][0].codes, out["a"][0].codes)
