"""Weight grids: each against its independent codec, exact storage costs, error ordering, errors."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats.codebooks import nf4_dequantize, nf4_quantize, ternary_dequantize
from lowbit.formats.codebooks import ternary_quantize as ternary_ref
from lowbit.formats.grid_base import (
    WeightGrid,
    apply_grouped,
    group_params,
    group_slices,
    grouped_args,
    n_groups,
    stack_groups,
)
from lowbit.formats.grids import GRID_NAMES, get_grid
from lowbit.formats.grids_lut import Nf4Grid, weighted_kmeans_rows
from lowbit.formats.integer import IntGrid
from lowbit.formats.minifloat import E4M3, decode, max_value
from lowbit.formats.mx import (
    mx_count_saturated,
    mx_dequantize,
    mx_quantize,
    nvfp4_count_saturated,
    nvfp4_dequantize,
    nvfp4_quantize,
)
from lowbit.methods.rtn import rtn

INT_NAMES = ["w4g64", "w3g64-asym", "w8", "w4-tensor", "w4g32-mse"]


def gauss(rows: int, cols: int, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * std


def heavy(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian with a few Student-t rows and one large outlier."""
    w = gauss(rows, cols, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w[::16] = torch.randn(len(w[::16]), cols, generator=g) * 0.02 / torch.rand(cols, generator=g)
    w[1, 5] = 0.9
    return w


def rel_err(name: str, w: torch.Tensor) -> float:
    w_hat = rtn(w, get_grid(name)).dequantize()
    return float((w - w_hat).norm() / w.norm())


# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "name", [*GRID_NAMES, *INT_NAMES, "mxfp4-ceil", "mxint8-ceil", "mxfp6-e2m3-mse"]
)
def test_names_resolve_to_grids(name: str) -> None:
    grid = get_grid(name)
    assert isinstance(grid, WeightGrid)
    assert grid.name == name
    if name.upper() in PRESET_SCHEMES:  # upper case is compressed-tensors' preset (NVFP4 = W4A4)
        with pytest.raises(LowbitError, match="quantizes activations"):
            get_grid(name.upper())
    else:
        assert get_grid(name.upper()).name == name


@pytest.mark.parametrize(
    "name,needle",
    [
        ("nf3", "4 bits only"),
        ("nf4-g100", "32, 64, 128, 256"),
        ("fp8-e3m4", "e4m3, e5m2"),
        ("fp8-e4m3-b64", "128x128"),
        ("fp4-g48", "16, 32, 64, 128"),
        ("mxfp4-g16", "32 only"),
        ("mxfp6", "mxfp6-e3m2"),
        ("mxint4", "mxint8"),
        ("nvfp4-g32", "16 only"),
        ("sq5", "2, 3, 4"),
        ("w9g64", "2..8"),
        ("int4", "known: nf4, nf4-dq"),
        ("bogus", "w4g64"),
    ],
)
def test_bad_names(name: str, needle: str) -> None:
    with pytest.raises(LowbitError, match=needle):
        get_grid(name)


@pytest.mark.parametrize(
    "name,in_f,needle",
    [
        ("nf4", 96, "nf4 blocks that do: 32"),
        ("fp4-g32", 80, "fp4 groups that do: 16"),
        ("mxfp4", 48, "multiple of 32"),
        ("nvfp4", 40, "multiple of 16"),
        ("w4g64", 96, "group sizes that do: 16, 32"),
    ],
)
def test_bad_shapes(name: str, in_f: int, needle: str) -> None:
    with pytest.raises(LowbitError, match=needle):
        rtn(gauss(4, in_f), get_grid(name))


@pytest.mark.parametrize("bad,word", [(float("nan"), "1 NaN"), (float("inf"), "1 inf")])
@pytest.mark.parametrize("name", ["nf4", "nvfp4", "ternary", "sq3", "fp8-e4m3", "w4g64"])
def test_non_finite_weights(name: str, bad: float, word: str) -> None:
    w = gauss(8, 64)
    w[2, 3] = bad
    with pytest.raises(LowbitError, match=word):
        rtn(w, get_grid(name))


# ------------------------------------------------------------- against the independent codecs


@pytest.mark.parametrize("block", [64, 128])
def test_nf4_matches_codebooks(block: int) -> None:
    w = heavy(24, 256)
    grid = Nf4Grid(block)
    gw = rtn(w, grid)
    w_hat = gw.dequantize()
    ref = nf4_quantize(w, block)
    assert torch.equal(gw.codes, ref["codes"])
    assert torch.equal(w_hat, nf4_dequantize(ref))
    assert torch.equal(nf4_dequantize(grid.stored(gw.codes, gw.params)), w_hat)


def test_nf4_dq_bitsandbytes_codes() -> None:
    w = heavy(40, 512)  # 320 block scales: a full and a partial second-level block of 256
    grid = Nf4Grid(64, double_quant=True, stored_scale_codes=False)
    gw = rtn(w, grid)
    ref = nf4_quantize(w, 64, double_quant=True)
    stored = grid.stored(gw.codes, gw.params)
    for key in ("codes", "absmax_codes", "absmax_scale", "absmax_offset"):
        assert torch.equal(stored[key], ref[key]), key
    assert torch.equal(gw.dequantize(), nf4_dequantize(ref))


def test_nf4_dq_codes_against_stored_scales() -> None:
    w = heavy(40, 512)
    grid = get_grid("nf4-dq")
    gw = rtn(w, grid)
    w_hat = gw.dequantize()
    ref = nf4_quantize(w, 64, double_quant=True)
    stored = grid.stored(gw.codes, gw.params)
    for key in ("absmax_codes", "absmax_scale", "absmax_offset"):
        assert torch.equal(stored[key], ref[key]), key
    assert torch.equal(nf4_dequantize(stored), w_hat)
    # same stored scales, each code the nearest for them: never worse per element
    assert bool(((w_hat - w).abs() <= (nf4_dequantize(ref) - w).abs()).all())
    # finalize path (no prepare): the fp32 absmaxes double-quantized after fitting, whether
    # the groups are fitted one by one and stacked or all at once
    slices = group_slices(grid, w.shape[1])
    one_by_one = stack_groups(grid, [grid.fit(w[:, sl], group=g) for g, sl in enumerate(slices)])
    for late in (grid.finalize(one_by_one), grid.finalize(grid.fit_all(w))):
        for key in ("absmax", "absmax_code", "dq_offset", "dq_block_scales"):
            assert torch.equal(late[key], gw.params[key]), key


FP8_ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def _ml_round(v: np.ndarray, dtype: type) -> np.ndarray:
    return v.astype(dtype).astype(np.float32)


@pytest.mark.parametrize("elem", ["e4m3", "e5m2"])
@pytest.mark.parametrize("gran", ["", "-tensor", "-b128"])
def test_fp8_matches_ml_dtypes(elem: str, gran: str) -> None:
    w = heavy(200, 320).numpy()  # partial 128x128 blocks in both dimensions
    vmax = np.float32(float(ml_dtypes.finfo(FP8_ML[elem]).max))
    if gran == "":
        amax = np.abs(w).max(1, keepdims=True)
    elif gran == "-tensor":
        amax = np.full((w.shape[0], 1), np.abs(w).max(), dtype=np.float32)
    else:
        amax = np.zeros_like(w)
        for r in range(0, 200, 128):
            for c in range(0, 320, 128):
                amax[r : r + 128, c : c + 128] = np.abs(w[r : r + 128, c : c + 128]).max()
    scale = (amax / vmax).astype(np.float32)
    ref = _ml_round(w / scale, FP8_ML[elem]) * scale
    gw = rtn(torch.from_numpy(w), get_grid(f"fp8-{elem}{gran}"))
    assert np.array_equal(gw.dequantize().numpy(), ref)
    assert gw.n_saturated == 0
    # stored scales: per channel, one per tensor, one per (partial) 128x128 block
    stored = {"": (200, 1), "-tensor": (1, 1), "-b128": (2, 3)}[gran]
    assert tuple(gw.to_tensors()["scales"].shape) == stored


def test_fp4_g32_matches_ml_dtypes() -> None:
    w = heavy(16, 256).numpy()
    blocks = w.reshape(16, -1, 32)
    exact = np.abs(blocks).max(-1, keepdims=True) / np.float32(6)
    s16 = exact.astype(np.float16)
    s16 = np.where(s16.astype(np.float32) < exact, np.nextafter(s16, np.float16(np.inf)), s16)
    scale = s16.astype(np.float32)
    ref = (_ml_round(blocks / scale, ml_dtypes.float4_e2m1fn) * scale).reshape(w.shape)
    gw = rtn(torch.from_numpy(w), get_grid("fp4-g32"))
    assert np.array_equal(gw.dequantize().numpy(), ref)


MX_ELEMS = {
    "mxfp4": "fp4_e2m1",
    "mxfp6-e3m2": "fp6_e3m2",
    "mxfp6-e2m3": "fp6_e2m3",
    "mxfp8-e4m3": "fp8_e4m3",
    "mxfp8-e5m2": "fp8_e5m2",
    "mxint8": "int8",
}


# the element format's largest value and half its top step: a value counts as saturated when
# it lies more than half a step beyond the largest value (the codecs count anything beyond it)
TOP_HALF = {
    "fp4_e2m1": (6.0, 1.0),
    "fp6_e3m2": (28.0, 2.0),
    "fp6_e2m3": (7.5, 0.25),
    "fp8_e4m3": (448.0, 16.0),
    "fp8_e5m2": (57344.0, 4096.0),
    "int8": (127 / 64, 1 / 128),
}


@pytest.mark.parametrize("name", list(MX_ELEMS))
def test_mx_matches_mx_codec(name: str) -> None:
    w = heavy(16, 256)
    gw = rtn(w, get_grid(name))
    ref_codes, ref_scales = mx_quantize(w, MX_ELEMS[name])
    assert torch.equal(gw.codes, ref_codes)
    assert torch.equal(gw.params["scale_code"], ref_scales)
    assert torch.equal(gw.dequantize(), mx_dequantize(ref_codes, ref_scales, MX_ELEMS[name]))
    top, half = TOP_HALF[MX_ELEMS[name]]
    x = torch.exp2(ref_scales.double() - 127).repeat_interleave(32, 1)
    beyond = (w.double().abs() / x > top + half).sum(1)
    assert torch.equal(gw.saturated, beyond)  # per output row
    assert 0 < gw.n_saturated <= mx_count_saturated(w, MX_ELEMS[name])


def test_nvfp4_matches_mx_codec() -> None:
    w = heavy(16, 256)
    gw = rtn(w, get_grid("nvfp4"))
    ref = nvfp4_quantize(w)
    assert torch.equal(gw.codes, ref[0])
    assert torch.equal(gw.params["scale_code"], ref[1])
    assert torch.equal(gw.params["tensor_scale"], ref[2])
    assert torch.equal(gw.dequantize(), nvfp4_dequantize(*ref))
    block = decode(ref[1], E4M3).double().repeat_interleave(16, 1) * ref[2].double()
    beyond = (w.double().abs() / block > 6 + 1).sum(1)
    assert torch.equal(gw.saturated, beyond)
    assert gw.n_saturated <= nvfp4_count_saturated(w)


def test_ternary_matches_codebooks() -> None:
    w = heavy(16, 256)
    gw = rtn(w, get_grid("ternary"))
    ref_codes, gamma = ternary_ref(w)
    assert torch.equal(gw.codes, ref_codes)
    assert torch.equal(gw.dequantize(), ternary_dequantize(ref_codes, gamma))
    n_clipped = int(((w / gamma).abs() > 1.5).sum())
    assert gw.n_saturated == n_clipped > 0


def _fp16_up(s: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= s (scales are stored in fp16, rounded so nothing clips)."""
    h = s.half()
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < s, up, h).float()


def int_reference(
    w: torch.Tensor, grid: IntGrid, sens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, w_hat, clipped mask) of integer RTN written from the definitions, group by group:
    symmetric s = absmax / ((2^b - 1) / 2) with zero 2^(b-1); asymmetric s = span / (2^b - 1)
    over a range that contains 0, zero = round(-min / s); ``-mse`` shrinks the range by
    1 - 0.8 i / 80 (i = 1..80) and keeps the first factor with a strictly smaller
    sensitivity-weighted squared error. Clipped: more than half a step outside [0, 2^b - 1]."""
    out_f, in_f = w.shape
    qmax = (1 << grid.bits) - 1
    x_all, s_all = w, sens.expand(out_f, in_f)
    if grid.granularity == "tensor":
        x_all, s_all = w.reshape(1, -1), s_all.reshape(1, -1)
    gs = grid.group_size or x_all.shape[1]
    codes, w_hat = torch.empty_like(x_all), torch.empty_like(x_all)
    clipped = torch.empty_like(x_all, dtype=torch.bool)

    def qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if grid.symmetric:
            a = torch.maximum(lo.abs(), hi.abs())
            s = _fp16_up(torch.where(a == 0, 1.0, a) / (qmax / 2))
            return s, torch.full_like(s, float(1 << (grid.bits - 1)))
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = _fp16_up(torch.where(hi - lo == 0, 1.0, hi - lo) / qmax)
        return s, torch.round(-lo / s).clamp(0, qmax)

    for c0 in range(0, x_all.shape[1], gs):
        x, cw = x_all[:, c0 : c0 + gs], s_all[:, c0 : c0 + gs]

        def rnd(s, z, x=x):
            q = torch.clamp(torch.round(x / s) + z, 0, qmax)
            return q, s * (q - z)

        lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        s, z = qparams(lo, hi)
        if grid.clip == "mse":
            best = ((rnd(s, z)[1] - x) ** 2 * cw).sum(1, keepdim=True)
            for i in range(1, 81):
                p = 1 - 0.8 * i / 80
                s2, z2 = qparams(p * lo, p * hi)
                e = ((rnd(s2, z2)[1] - x) ** 2 * cw).sum(1, keepdim=True)
                better = e < best
                best, s, z = (torch.where(better, e, best), torch.where(better, s2, s),
                              torch.where(better, z2, z))
        codes[:, c0 : c0 + gs], w_hat[:, c0 : c0 + gs] = rnd(s, z)
        v = x / s + z
        clipped[:, c0 : c0 + gs] = (v < -0.5) | (v > qmax + 0.5)
    return codes.reshape(w.shape), w_hat.reshape(w.shape), clipped.reshape(w.shape)


@pytest.mark.parametrize("name", INT_NAMES)
def test_int_matches_reference(name: str) -> None:
    w = heavy(16, 256)
    sens = torch.rand(256, generator=torch.Generator().manual_seed(3)) + 0.1
    grid = get_grid(name)
    gw = rtn(w, grid, sensitivity=sens)
    codes, w_hat, clipped = int_reference(w, grid, sens)
    assert gw.codes.dtype == torch.uint8
    assert torch.equal(gw.codes.float(), codes)
    assert torch.equal(gw.dequantize(), w_hat)
    assert torch.equal(gw.saturated, clipped.sum(1))
    assert (gw.n_saturated > 0) == (grid.clip == "mse")  # min-max ranges clip nothing
    if name.endswith("-mse"):  # the weighting matters: unweighted picks other ranges
        assert not torch.equal(rtn(w, grid).dequantize(), w_hat)


def _kmeans_loop(x: np.ndarray, s: np.ndarray, k: int, iters: int) -> np.ndarray:
    n = len(x)
    c = np.sort(x)[((2 * np.arange(k) + 1) * n) // (2 * k)]
    for _ in range(iters):
        a = np.array([np.searchsorted((c[1:] + c[:-1]) / 2, v, side="left") for v in x])
        for j in range(k):
            if s[a == j].sum() > 0:
                c[j] = (s[a == j] * x[a == j]).sum() / s[a == j].sum()
        c = np.sort(c)
    return c


@pytest.mark.parametrize("bits", [3, 4])
def test_squeezellm_tables(bits: int) -> None:
    w = heavy(8, 192)
    sens = torch.rand(192, generator=torch.Generator().manual_seed(4)) ** 3
    gw = rtn(w, get_grid(f"sq{bits}"), sensitivity=sens)
    w_hat = gw.dequantize()
    table = gw.params["table"]
    assert table.shape == (8, 1 << bits)
    assert torch.equal(table, table.half().float())  # stored in fp16
    assert bool((table[:, 1:] >= table[:, :-1]).all())
    # every weight on its row's nearest table entry
    dist = (w[:, :, None] - table[:, None, :]).abs()
    assert torch.equal((w_hat - w).abs(), dist.min(-1).values)
    for r in (0, 3):
        ref = _kmeans_loop(w[r].double().numpy(), sens.double().numpy(), 1 << bits, 30)
        got = weighted_kmeans_rows(w[r : r + 1], sens, 1 << bits)[0].numpy()
        assert np.allclose(got, ref, rtol=0, atol=1e-12)


def test_squeezellm_sensitivity_pulls_a_centroid() -> None:
    w = gauss(4, 128)
    sens = torch.ones(128)
    sens[7] = 1e6
    w_hat = rtn(w, get_grid("sq3"), sensitivity=sens).dequantize()
    assert torch.allclose(w_hat[:, 7], w[:, 7], rtol=1e-3, atol=0)
    # (out, in) sensitivity: the same weighting given per row
    again = rtn(w, get_grid("sq3"), sensitivity=sens.expand(4, 128)).dequantize()
    assert torch.equal(again, w_hat)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from([*GRID_NAMES, "w4g32", "w3g64-asym"]),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-4, 0.02, 3.0]),
)
def test_grid_points_are_fixed_points(name: str, seed: int, scale: float) -> None:
    grid = get_grid(name)
    w = gauss(8, 128, seed, scale)
    gw = rtn(w, grid)
    w_hat = gw.dequantize()
    assert gw.codes.shape == w.shape and not gw.codes.is_floating_point()
    assert w_hat.dtype == torch.float32
    again = torch.cat(
        [
            grid.decode(grid.encode(w_hat[:, sl], group_params(grid, gw.params, g)),
                        group_params(grid, gw.params, g))
            for g, sl in enumerate(group_slices(grid, 128))
        ],
        1,
    )
    assert torch.equal(again, w_hat)
    # the same through the whole-tensor (grouped view) path
    codes = apply_grouped(grid, grid.encode, w_hat, gw.params)
    assert torch.equal(apply_grouped(grid, grid.decode, codes, gw.params), w_hat)
    xv, pv = grouped_args(grid, w_hat, gw.params)
    mask = grid.saturated(xv, pv)  # a mask of x's shape: no grid point is clipped
    assert mask.shape == xv.shape and not bool(mask.any())


# --------------------------------------------------------------------- stacked parameters


@pytest.mark.parametrize("name", [*GRID_NAMES, *INT_NAMES, "w4g64-asym-mse", "mxfp4-mse"])
def test_fit_all_stacks_the_groups(name: str) -> None:
    """``fit_all`` equals fitting group by group (``fit`` with the group's columns and
    sensitivity) and stacking; group keys are (rows, n_groups), the rest shared."""
    grid = get_grid(name)
    w = heavy(16, 256)
    sens = torch.rand(256, generator=torch.Generator().manual_seed(5)) + 0.1
    ctx = grid.prepare(w, sens)
    stacked = grid.fit_all(w, sens, ctx)
    slices = group_slices(grid, 256)
    assert len(slices) == n_groups(grid, 256)
    one_by_one = stack_groups(
        grid, [grid.fit(w[:, sl], sens[sl], ctx=ctx, group=g) for g, sl in enumerate(slices)]
    )
    assert set(stacked) == set(one_by_one)
    for k, v in stacked.items():
        assert torch.equal(v, one_by_one[k]), k
        if k in grid.group_keys:
            assert tuple(v.shape) == (16, len(slices)), k
        if k in grid.row_keys:
            assert v.shape[0] == 16, k
    for g in range(len(slices)):
        p = group_params(grid, stacked, g)
        for k in grid.group_keys:
            if k in p:
                assert torch.equal(p[k], stacked[k][:, g : g + 1])


# -------------------------------------------------------------------------- storage costs


@pytest.mark.parametrize(
    "name,out_f,in_f,bpw",
    [
        ("nf4", 512, 576, 4.5),
        ("nf4-dq", 4096, 4096, 4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2),
        ("nf4-dq", 40, 512, 4 + 8 / 64 + (2 * 32 + 32) / (40 * 512)),
        ("mxfp4", 512, 576, 4.25),
        ("mxfp6-e2m3", 512, 576, 6.25),
        ("mxint8", 512, 576, 8.25),
        ("nvfp4", 512, 576, 4.5 + 32 / (512 * 576)),
        ("fp8-e4m3", 512, 576, 8 + 32 / 576),
        ("fp8-e5m2-tensor", 512, 576, 8 + 32 / (512 * 576)),
        ("fp8-e4m3-b128", 512, 576, 8 + 32 * 4 * 5 / (512 * 576)),
        ("fp4-g32", 512, 576, 4.5),
        ("sq4", 512, 576, 4 + 256 / 576),
        ("sq3", 512, 576, 3 + 128 / 576),
        ("ternary", 512, 576, 2 + 32 / (512 * 576)),
        ("w4g64", 512, 576, 4.25),
    ],
)
def test_bits_per_weight(name: str, out_f: int, in_f: int, bpw: float) -> None:
    assert get_grid(name).bits_per_weight(out_f, in_f) == pytest.approx(bpw, rel=1e-12)


def test_nf4_dq_is_qlora_4127() -> None:
    assert get_grid("nf4-dq").bits_per_weight(4096, 4096) == pytest.approx(4.127, abs=5e-4)


# ------------------------------------------------------------------ errors and saturation


def test_rtn_error_ordering() -> None:
    w = gauss(128, 512, seed=7)
    assert rel_err("nf4", w) < rel_err("w4g64", w)
    assert rel_err("nvfp4", w) < rel_err("mxfp4", w)
    assert rel_err("sq3", w) < rel_err("w3", w)
    assert rel_err("sq4", w) < rel_err("w4", w)
    assert rel_err("fp8-e4m3", w) < rel_err("fp8-e5m2", w)
    assert rel_err("mxint8", w) < rel_err("mxfp8-e4m3", w)
    assert rel_err("ternary", w) > rel_err("w3", w)


def test_saturation_is_counted() -> None:
    w = gauss(8, 64)
    grid = get_grid("fp8-e4m3-tensor")
    params = grid.fit(w, ctx=grid.prepare(w))
    assert not bool(grid.saturated(w, params).any())
    doubled = 2 * w
    codes = grid.encode(doubled, params)
    n_over = int((doubled.abs() / params["scale"] > 448 + 16).sum())
    mask = grid.saturated(doubled, params)
    assert torch.equal(mask, doubled.abs() / params["scale"] > 448 + 16)
    assert int(mask.sum()) == n_over > 0
    top = float(grid.decode(codes, params).abs().max())
    assert top == pytest.approx(float(w.abs().max()), rel=1e-6)  # clipped to 448 * scale
    # MX: amax 7.9 gets X = 2^(2-2) = 1 and clips to 6 (counted); 6.9 rounds to 6 (not counted)
    x = torch.zeros(1, 32)
    x[0, :2] = torch.tensor([7.9, 6.9])
    gw = rtn(x, get_grid("mxfp4"))
    assert gw.dequantize()[0, :2].tolist() == [6.0, 6.0]
    assert gw.n_saturated == 1 and gw.saturated.tolist() == [1]  # per output row


def test_zero_weight() -> None:
    w = torch.zeros(4, 128)
    for name in [*GRID_NAMES, "w4g64"]:
        w_hat = rtn(w, get_grid(name)).dequantize()
        assert torch.equal(w_hat.abs(), w), name
        assert math.isfinite(float(w_hat.sum()))


@pytest.mark.parametrize("name", list(MX_ELEMS))
def test_mx_ceil_scale_never_saturates(name: str) -> None:
    """-ceil: the smallest power of two X with amax / X <= the element maximum (checked by
    ml_dtypes-free arithmetic); same codec otherwise, so it decodes with the plain MX decoder."""
    w = heavy(16, 256)
    gw = rtn(w, get_grid(f"{name}-ceil"))
    assert gw.n_saturated == 0
    scale_codes = gw.params["scale_code"]
    assert torch.equal(gw.dequantize(), mx_dequantize(gw.codes, scale_codes, MX_ELEMS[name]))
    top = 127 / 64 if name == "mxint8" else max_value(get_grid(name).fmt)
    amax = w.reshape(16, 8, 32).abs().amax(-1).double()
    x = torch.exp2(scale_codes.double() - 127)
    assert (amax / x <= top).all() and (amax / (x / 2) > top).all()
    floor_codes = rtn(w, get_grid(name)).params["scale_code"]
    assert ((scale_codes - floor_codes) >= 0).all() and ((scale_codes - floor_codes) <= 1).all()


def test_mx_ceil_keeps_the_block_maximum() -> None:
    # the floor rule's example above: 7.9 clips to 6 under X = 1; ceil takes X = 2: 7.9 -> 8
    x = torch.zeros(1, 32)
    x[0, :2] = torch.tensor([7.9, 6.9])
    gw = rtn(x, get_grid("mxfp4-ceil"))
    assert gw.dequantize()[0, :2].tolist() == [8.0, 6.0] and gw.n_saturated == 0
    with pytest.raises(LowbitError, match="floor"):
        get_grid("mxfp4").__class__("mxfp4", "nearest")


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8-e4m3", "mxint8"])
def test_mx_mse_scale_is_the_better_of_floor_and_ceil(name: str) -> None:
    w = heavy(16, 256)
    hdiag = torch.rand(32, generator=torch.Generator().manual_seed(3)) + 0.1
    grids = [get_grid(f"{name}{s}") for s in ("", "-ceil", "-mse")]
    blocks = w.reshape(16, 8, 32)
    errs = []
    for g in grids:
        err = []
        for b in range(8):
            p = g.fit(blocks[:, b], hdiag)
            err.append(((g.decode(g.encode(blocks[:, b], p), p) - blocks[:, b]) ** 2
                        * hdiag).double().sum(1))
        errs.append(torch.stack(err, 1))
    floor, ceil, mse = errs
    assert torch.allclose(mse, torch.minimum(floor, ceil), rtol=1e-9, atol=0)
    # which side wins depends on the element type: E2M1 loses (6, 8) of its top binade to
    # saturation but a whole bit when rounded up (both occur); E4M3 keeps 3 mantissa bits at
    # either exponent (ceil wins where they differ); MXINT8 only saturates in (127/64, 2)
    # (floor wins here, ceil halves the resolution)
    assert (mse < floor).any() == (name != "mxint8")
    assert (mse < ceil).any() == (name != "mxfp8-e4m3")
