"""OCP MX v1.0 block formats and NVFP4: scale rule, hand examples, bounds, ml_dtypes elements."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.formats.minifloat import E2M1, E4M3, decode, encode, max_value
from lowbit.formats.mx import (
    ELEMENTS,
    mx_bits_per_weight,
    mx_count_saturated,
    mx_dequantize,
    mx_quantize,
    nvfp4_bits_per_weight,
    nvfp4_count_saturated,
    nvfp4_dequantize,
    nvfp4_quantize,
)

FLOAT_ELEMS = [e for e in ELEMENTS if e != "int8"]
ML = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def block_of(*head: float, n: int = 32) -> torch.Tensor:
    x = torch.zeros(n)
    x[: len(head)] = torch.tensor(head)
    return x


def normal(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- hand examples of the rule


def test_amax_exactly_a_power_of_two() -> None:
    # amax = 4 = 2^2; E2M1 emax = 2, so X = 2^(2-2) = 1 (E8M0 code 127).
    x = block_of(4.0, 1.0, -2.0, 0.5, 3.0, -0.25)
    codes, scales = mx_quantize(x, "fp4_e2m1")
    assert scales.tolist() == [127]
    # E2M1 codes: 4 -> 0b0110, 1 -> 0b0010, -2 -> 0b1100, 0.5 -> 0b0001, 3 -> 0b0101;
    # -0.25 is the tie between 0 and 0.5 and goes to the even code: -0 (0b1000).
    assert codes[:7].tolist() == [6, 2, 12, 1, 5, 8, 0]
    assert mx_dequantize(codes, scales, "fp4_e2m1").tolist() == block_of(4, 1, -2, 0.5, 3).tolist()
    # The same block in MXFP8 E4M3 (emax 8): X = 2^-6 (code 121); 4 / X = 256 = 1.000 * 2^8.
    codes, scales = mx_quantize(x, "fp8_e4m3")
    assert scales.tolist() == [121] and codes[0] == 0b0_1111_000
    assert torch.equal(mx_dequantize(codes, scales, "fp8_e4m3"), x)


def test_mxint8_hand_example() -> None:
    # MXINT8: emax 0, so amax = 1 gives X = 1; elements are k/64 with k rounded half-to-even.
    x = block_of(1.0, -0.5, 0.5 + 1 / 128, 0.5 + 3 / 128, -1 / 64)
    codes, scales = mx_quantize(x, "int8")
    assert codes.dtype == torch.int8 and scales.tolist() == [127]
    assert codes[:5].tolist() == [64, -32, 32, 34, -1]
    assert mx_dequantize(codes, scales, "int8")[:5].tolist() == [1, -0.5, 0.5, 34 / 64, -1 / 64]
    # amax = 3 -> X = 2; 3 / 2 = 1.5 -> k = 96. Largest element 127/64; -128 is never produced.
    codes, scales = mx_quantize(block_of(3.0, -3.99), "int8")
    assert scales.tolist() == [128] and codes[:2].tolist() == [96, -127]
    assert mx_count_saturated(block_of(3.0, -3.99), "int8") == 1  # 3.99 / 2 > 127/64


def test_block_of_zeros() -> None:
    # All-zero block: the smallest scale 2^-127 (code 0) and zero elements.
    for elem in ELEMENTS:
        codes, scales = mx_quantize(torch.zeros(2, 32), elem)
        assert scales.tolist() == [[0], [0]] and not codes.any()
        assert not mx_dequantize(codes, scales, elem).any()


def test_amax_just_below_a_power_of_two() -> None:
    # amax = 8 - 2^-21 has floor(log2) = 2, so X = 1; a float32 log2 rounds it to exactly 3.0.
    below8 = torch.nextafter(torch.tensor(8.0), torch.tensor(0.0)).item()
    assert torch.log2(torch.tensor(below8)).item() == 3.0
    x = block_of(below8, 1.0)
    codes, scales = mx_quantize(x, "fp4_e2m1")
    assert scales.tolist() == [127]
    assert decode(codes[:2], E2M1).tolist() == [6.0, 1.0]  # amax saturates to the E2M1 max
    assert mx_count_saturated(x, "fp4_e2m1") == 1


def test_saturation_above_max_is_counted() -> None:
    # Scaled values fall in [2^emax, 2^(emax+1)) at the top; those above the element max clip.
    x = block_of(7.9, -6.5, 7.0, 6.0, 5.0, -4.0)  # X = 1 for E2M1 (max 6)
    codes, scales = mx_quantize(x, "fp4_e2m1")
    assert mx_count_saturated(x, "fp4_e2m1") == 3
    assert mx_dequantize(codes, scales, "fp4_e2m1")[:6].tolist() == [6, -6, 6, 6, 4, -4]
    y = block_of(500.0, 460.0, 448.0, -300.0)  # E4M3: X = 2^(8-8) = 1, max 448
    assert mx_count_saturated(y, "fp8_e4m3") == 2
    codes, scales = mx_quantize(y, "fp8_e4m3")
    assert mx_dequantize(codes, scales, "fp8_e4m3")[:4].tolist() == [448, 448, 448, -288]


def test_scale_clamped_to_e8m0_range() -> None:
    tiny = block_of(1e-40, -5e-41)  # floor(log2) = -133; -133 - 8 clamps to -127
    codes, scales = mx_quantize(tiny, "fp8_e4m3")
    assert scales.tolist() == [0]
    r = mx_dequantize(codes, scales, "fp8_e4m3")
    # Elements x / 2^-127 are E4M3 subnormals (step 2^-9): error at most 2^-10 * 2^-127.
    assert bool(((r - tiny).abs() <= 2.0**-137).all()) and r[0] > 0 and r[1] < 0
    huge = block_of(3e38, -1.0)  # floor(log2) = 127 -> exponent 125 for E2M1
    codes, scales = mx_quantize(huge, "fp4_e2m1")
    assert scales.tolist() == [127 + 125]
    assert mx_dequantize(codes, scales, "fp4_e2m1")[0].item() == pytest.approx(3e38, rel=0.2)


def test_nan_scale_decodes_to_nan_block() -> None:
    codes = torch.zeros(64, dtype=torch.uint8)
    r = mx_dequantize(codes, torch.tensor([255, 127], dtype=torch.uint8), "fp4_e2m1")
    assert r[:32].isnan().all() and not r[32:].isnan().any()


# ---------------------------------------------------------------- bounds and references


def elem_error_bound(elem: str) -> float:
    """Largest |error| / X: half the top spacing, or the clip from just under 2^(emax+1)."""
    if elem == "int8":
        return 2 - 127 / 64
    fmt = ELEMENTS[elem]
    top = 2.0 ** (fmt.emax + 1)
    return max(2.0 ** (fmt.emax - fmt.mbits - 1), top - max_value(fmt))


@pytest.mark.parametrize("elem", list(ELEMENTS))
def test_round_trip_error_bound(elem: str) -> None:
    x = normal(4 * 1024, 3).reshape(4, 1024) * torch.logspace(-3, 3, 1024)  # varied block ranges
    codes, scales = mx_quantize(x, elem)
    assert codes.shape == x.shape and scales.shape == (4, 32) and scales.dtype == torch.uint8
    r = mx_dequantize(codes, scales, elem)
    X = decode(scales, "E8M0").repeat_interleave(32, dim=-1)
    assert bool(((r - x).abs() <= X * elem_error_bound(elem)).all())
    nmse = ((r - x) ** 2).sum() / (x**2).sum()
    assert nmse < {"fp4_e2m1": 0.03, "fp6_e3m2": 0.005, "fp8_e5m2": 0.005}.get(elem, 0.002)


@pytest.mark.parametrize("elem", FLOAT_ELEMS)
def test_elements_match_ml_dtypes(elem: str) -> None:
    x = normal(64 * 32, 4).reshape(64, 32) * torch.logspace(-2, 2, 64)[:, None]
    codes, scales = mx_quantize(x, elem)
    scaled = x / decode(scales, "E8M0")  # one block per row; exact: X is a power of two
    ref = torch.from_numpy(scaled.numpy().astype(ML[elem]).view(np.uint8).copy())
    fmt = ELEMENTS[elem]
    # ml_dtypes sends E4M3 overflow to NaN and E5M2 overflow to inf; we clip (the MX rule).
    ok = scaled.abs() <= max_value(fmt) if fmt.has_nan else torch.ones_like(scaled, dtype=bool)
    assert torch.equal(codes[ok], ref[ok])
    assert torch.equal(codes[~ok], encode(scaled[~ok], fmt, saturate=True)[0])


def test_shapes_along_last_dim() -> None:
    x = normal(3 * 5 * 64, 5).reshape(3, 5, 64)
    codes, scales = mx_quantize(x, "fp6_e2m3")
    assert codes.shape == (3, 5, 64) and scales.shape == (3, 5, 2)
    assert mx_dequantize(codes, scales, "fp6_e2m3").shape == x.shape


def test_bits_per_weight() -> None:
    got = {e: mx_bits_per_weight(e) for e in ELEMENTS}
    assert got == {
        "fp8_e4m3": 8.25,
        "fp8_e5m2": 8.25,
        "fp6_e3m2": 6.25,
        "fp6_e2m3": 6.25,
        "fp4_e2m1": 4.25,
        "int8": 8.25,
    }
    assert nvfp4_bits_per_weight() == 4.5
    assert nvfp4_bits_per_weight(4096) == 4.5 + 32 / 4096


def test_errors() -> None:
    with pytest.raises(ValueError, match="allowed: fp8_e4m3, fp8_e5m2, fp6_e3m2"):
        mx_quantize(torch.zeros(32), "mxfp4")
    with pytest.raises(ValueError, match=r"does not divide the last dimension \(48\).*\[8, 16\]"):
        mx_quantize(torch.zeros(2, 48), "fp4_e2m1")
    with pytest.raises(ValueError, match="NaN or inf"):
        mx_quantize(block_of(float("nan")), "fp8_e4m3")
    with pytest.raises(ValueError, match="NaN or inf"):
        nvfp4_quantize(torch.full((16,), float("inf")))
    with pytest.raises(ValueError, match="scales have shape"):
        mx_dequantize(torch.zeros(64, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8), "int8")


# ---------------------------------------------------------------- NVFP4


def test_nvfp4_hand_example() -> None:
    # amax = 12: g = 12 / (448 * 6). Block 1 has amax 12: scale e4m3(12 / (6 g)) = 448 and
    # elements x / (448 g) = x / 2. Block 2 has amax 1: 1 / (6 g) = 37.33 rounds to 36 in E4M3,
    # so 1 / (36 g) = 6.22 clips to 6 (counted) and 0.5 -> 3.11 -> 3.
    x = torch.cat([block_of(12.0, -6.0, 3.0, 1.0, n=16), block_of(1.0, 0.5, n=16)])
    codes, scales, g = nvfp4_quantize(x)
    assert g.dtype == torch.float32 and g.item() == pytest.approx(12 / 2688)
    assert decode(scales, E4M3).tolist() == [448.0, 36.0]
    assert decode(codes, E2M1)[:4].tolist() == [6.0, -3.0, 1.5, 0.5]
    assert decode(codes, E2M1)[16:18].tolist() == [6.0, 3.0]
    assert nvfp4_count_saturated(x) == 1
    r = nvfp4_dequantize(codes, scales, g)
    assert torch.allclose(r[:16], x[:16], rtol=1e-6)
    assert r[16:18].tolist() == pytest.approx([6 * 36 * 12 / 2688, 3 * 36 * 12 / 2688], rel=1e-6)


def test_nvfp4_zero_tensor() -> None:
    codes, scales, g = nvfp4_quantize(torch.zeros(4, 32))
    assert g.item() == 1.0 and not codes.any() and not scales.any()
    assert not nvfp4_dequantize(codes, scales, g).any()


def test_nvfp4_beats_mxfp4_on_normal_data() -> None:
    x = normal(4096, 6)
    c, s = mx_quantize(x, "fp4_e2m1")
    mx_err = (mx_dequantize(c, s, "fp4_e2m1") - x).pow(2).mean()
    c, s, g = nvfp4_quantize(x)
    assert c.shape == x.shape and s.shape == (4096 // 16,)
    nv_err = (nvfp4_dequantize(c, s, g) - x).pow(2).mean()
    assert nv_err < mx_err
