"""GridWeight, the one quantized-weight type: stored tensors round-trip bit-identically for every
grid, ``dequantize`` against group-by-group references (act-order's g_idx, partial FP8 blocks),
row splits, storage accounting and errors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import n_groups
from lowbit.formats.grids import GRID_NAMES, get_grid
from lowbit.formats.minifloat import E4M3, decode
from lowbit.formats.weight import GridWeight
from lowbit.methods.gptq import gptq_quantize, prepare_hessian
from lowbit.methods.rtn import rtn

INT_NAMES = ["w4g32", "w3g64-asym", "w8", "w8-tensor"]
ROUND_TRIP = [*GRID_NAMES, *INT_NAMES, "nf4-g32", "mxfp4-mse", "w4g64-asym-mse"]
OUT, IN = 200, 320  # partial 128x128 FP8 blocks in both dimensions; 1000 NF4-DQ absmaxes


def weight(rows: int = OUT, cols: int = IN, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[::16] *= 1 / (torch.rand(cols, generator=g) + 0.05)  # heavy rows
    w[1, 5] = 0.9
    return w


def hessian(d: int = IN, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
                                             / d**0.5)
    x *= torch.linspace(0.1, 3.0, d)[torch.randperm(d, generator=g)]  # a skewed diagonal
    return 2 * x.T @ x / x.shape[0]


SENS = torch.rand(IN, generator=torch.Generator().manual_seed(2)) + 0.1


def act_order_weight(name: str) -> GridWeight:
    """An integer weight rounded by GPTQ with act-order: groups formed in rounding order."""
    gw = gptq_quantize(weight(48), prepare_hessian(hessian(), act_order=True), get_grid(name))
    assert gw.g_idx is not None
    return gw


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (tells -0.0 from 0.0)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        t.element_size()])


def assert_same(a: GridWeight, b: GridWeight, skip: tuple[str, ...] = ()) -> None:
    assert a.grid == b.grid and a.shape == b.shape
    assert a.codes.dtype == b.codes.dtype and torch.equal(a.codes, b.codes)
    assert set(a.params) == set(b.params)
    for k, v in a.params.items():
        if k not in skip:
            assert b.params[k].dtype == v.dtype and torch.equal(bits(b.params[k]), bits(v)), k
    assert (a.g_idx is None) == (b.g_idx is None)
    if a.g_idx is not None:
        assert b.g_idx.dtype == a.g_idx.dtype == torch.int32 and torch.equal(a.g_idx, b.g_idx)
    assert torch.equal(bits(a.dequantize()), bits(b.dequantize()))


# ------------------------------------------------------------------------ stored tensors


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_tensors_round_trip_bit_identically(name: str, tmp_path) -> None:
    grid = get_grid(name)
    gw = rtn(weight(), grid, SENS)
    tensors = gw.to_tensors()
    assert all(t.is_contiguous() for t in tensors.values())
    save_file(tensors, str(tmp_path / "w.safetensors"))  # refuses shared or strided tensors
    back = GridWeight.from_tensors(grid, gw.shape, load_file(str(tmp_path / "w.safetensors")))
    # NF4-DQ's fp32 absmax before double quantization is a fitting intermediate: not stored
    assert_same(gw, back, skip=("absmax_raw",) if name == "nf4-dq" else ())
    again = back.to_tensors()  # the stored form is a fixed point
    assert set(again) == set(tensors)
    for k, t in tensors.items():
        assert again[k].dtype == t.dtype and torch.equal(bits(again[k]), bits(t)), k
    assert back.storage_bytes() == gw.storage_bytes()
    assert back.bits_per_weight() == gw.bits_per_weight()


@pytest.mark.parametrize("name", ["w4g32", "w3g64-asym"])
def test_act_order_weight_round_trips(name: str, tmp_path) -> None:
    gw = act_order_weight(name)
    tensors = gw.to_tensors()
    assert tensors["g_idx"].dtype == torch.int32 and tensors["g_idx"].shape == (IN,)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    back = GridWeight.from_tensors(gw.grid, gw.shape, load_file(str(tmp_path / "w.safetensors")))
    assert_same(gw, back)
    # g_idx costs one int32 per input column on top of the grid's own accounting
    assert gw.bits_per_weight() == gw.grid.bits_per_weight(*gw.shape) + 32 / gw.shape[0]
    without = GridWeight(gw.grid, gw.codes, gw.params)
    assert gw.storage_bytes() - without.storage_bytes() == 4 * IN


@pytest.mark.parametrize("name", [*GRID_NAMES, "w4g32", "w8"])
def test_storage_bytes_match_bits_per_weight(name: str) -> None:
    """Where packing needs no padding, the stored bytes are exactly the grid's accounting."""
    gw = rtn(weight(64, 256), get_grid(name), SENS[:256])
    assert gw.storage_bytes() * 8 == pytest.approx(gw.bits_per_weight() * 64 * 256, rel=1e-12)


def test_from_tensors_errors() -> None:
    grid = get_grid("w4g32")
    tensors = rtn(weight(), grid).to_tensors()
    with pytest.raises(LowbitError, match="lacks the tensor 'scales'"):
        GridWeight.from_tensors(grid, (OUT, IN), {"qweight": tensors["qweight"]})
    with pytest.raises(LowbitError, match=r"w4g32 weight of shape \(100, 320\)"):
        GridWeight.from_tensors(grid, (100, IN), tensors)
    with pytest.raises(LowbitError, match="mxfp4 weight lacks the tensor 'scale_codes'"):
        GridWeight.from_tensors(get_grid("mxfp4"), (OUT, IN), tensors)


# ------------------------------------------------------------- dequantize vs references


def per_group_dequantize(gw: GridWeight) -> torch.Tensor:
    """Decode one group at a time: the columns of group g (from g_idx, else contiguous blocks
    of group_size) with column g of every stacked parameter."""
    grid = gw.grid
    out_f, in_f = gw.shape
    gs = grid.group_size or in_f
    groups = torch.arange(in_f) // gs if gw.g_idx is None else gw.g_idx.long()
    w = torch.full((out_f, in_f), float("nan"))
    for g in range(n_groups(grid, in_f)):
        cols = (groups == g).nonzero()[:, 0]
        p = {k: v[:, g : g + 1] if k in grid.group_keys else v for k, v in gw.params.items()}
        w[:, cols] = grid.decode(gw.codes[:, cols], p)
    return w


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_dequantize_is_the_per_group_decoding(name: str) -> None:
    gw = rtn(weight(), get_grid(name), SENS)
    assert torch.equal(gw.dequantize(), per_group_dequantize(gw))
    for g in range(gw.n_groups):  # group_params: the (rows, 1) views of the group keys
        p = gw.group_params(g)
        for k in gw.grid.group_keys:
            if k in p:
                assert p[k].shape == (OUT, 1) and torch.equal(p[k], gw.params[k][:, g : g + 1])


@pytest.mark.parametrize("name", ["w4g32", "w3g64-asym"])
def test_dequantize_follows_g_idx(name: str) -> None:
    gw = act_order_weight(name)
    w_hat = gw.dequantize()
    assert torch.equal(w_hat, per_group_dequantize(gw))
    # the integer formula, column by column: w_hat[:, c] = s_g (q - z_g), g = g_idx[c]
    g = gw.g_idx.long()
    ref = gw.params["scale"][:, g] * (gw.codes.float() - gw.params["zero"][:, g])
    assert torch.equal(w_hat, ref)
    # act-order's groups are not the contiguous blocks, and dropping g_idx changes the weight
    assert not torch.equal(g, torch.arange(IN) // gw.grid.group_size)
    assert sorted(g.tolist()) == sorted((torch.arange(IN) // gw.grid.group_size).tolist())
    assert not torch.equal(GridWeight(gw.grid, gw.codes, gw.params).dequantize(), w_hat)


@pytest.mark.parametrize("elem", ["e4m3", "e5m2"])
def test_fp8_partial_blocks_decode_from_the_stored_block_scales(elem: str) -> None:
    """fp8-*-b128 on a 200x320 weight: 2x3 stored scales, the last row and column blocks
    partial (72 rows, 64 columns); every element decodes with its block's scale."""
    gw = rtn(weight(), get_grid(f"fp8-{elem}-b128"))
    scales = gw.to_tensors()["scales"]
    assert scales.shape == (2, 3) and scales.dtype == torch.float32
    fp8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[elem]
    elems = torch.from_numpy(gw.codes.numpy().view(fp8).astype(np.float32))
    ref = torch.empty(OUT, IN)
    for r in range(0, OUT, 128):
        for c in range(0, IN, 128):
            ref[r : r + 128, c : c + 128] = elems[r : r + 128, c : c + 128] * scales[r // 128,
                                                                                   c // 128]
    w_hat = gw.dequantize()
    assert torch.equal(w_hat, ref)
    assert torch.equal(w_hat, per_group_dequantize(gw))
    if elem == "e4m3":
        assert torch.equal(decode(gw.codes, E4M3), elems)  # the two decoders agree


# --------------------------------------------------------------------------- row splits


@pytest.mark.parametrize("name", [n for n in [*GRID_NAMES, *INT_NAMES] if get_grid(n).stackable])
def test_split_rows_of_stacked_rtn(name: str) -> None:
    """Rows are independent on stackable grids: rounding two weights stacked, then splitting,
    gives exactly what rounding each alone gives (the parts own their memory)."""
    grid = get_grid(name)
    a, b = weight(48, IN, seed=3), 3 * weight(80, IN, seed=4)
    sens = SENS.expand(128, IN)
    parts = rtn(torch.cat([a, b]), grid, sens).split_rows([48, 80])
    for part, alone in zip(parts, [rtn(a, grid, sens[:48]), rtn(b, grid, sens[48:])],
                           strict=True):
        assert_same(part, alone)
        assert torch.equal(part.saturated, alone.saturated)
    ptrs = [t.untyped_storage().data_ptr() for p in parts for t in [p.codes, *p.params.values()]]
    assert len(set(ptrs)) == len(ptrs)  # no part is a view into the stacked weight


@pytest.mark.parametrize("name", [n for n in [*GRID_NAMES, *INT_NAMES]
                                  if not get_grid(n).stackable])
def test_unstackable_grids_refuse_row_splits(name: str) -> None:
    """Grids with parameters spanning rows (tensor scales, 128-row blocks, NF4-DQ's second
    level) are not stackable: rounding stacked changes the result, and split_rows refuses."""
    grid = get_grid(name)
    a, b = weight(48, IN, seed=3), 3 * weight(80, IN, seed=4)
    stacked = rtn(torch.cat([a, b]), grid)
    assert not torch.equal(stacked.dequantize()[:48], rtn(a, grid).dequantize())
    with pytest.raises(LowbitError, match="cannot be split by rows"):
        stacked.split_rows([48, 80])
