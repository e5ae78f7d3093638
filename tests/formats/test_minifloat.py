"""Minifloat encode/decode against torch's float8 dtypes and ml_dtypes.

Out-of-range behaviour differs between the references and our saturate=True default:
- torch 2.13 `.to(float8_e4m3fn)` saturates finite overflow to +-448 and also turns +-inf into
  +-448; ml_dtypes turns E4M3 overflow (|x| > 464) and inf into NaN. Ours: saturate=True gives
  +-448 (and raises on inf, which E4M3 cannot hold); saturate=False gives NaN like ml_dtypes.
- torch and ml_dtypes send E5M2 overflow (|x| >= 61440) to +-inf; ours does with saturate=False.
- ml_dtypes' FP6/FP4 types saturate overflow and inf to +-max and turn NaN into +-0; ours
  saturates finite overflow and raises on NaN/inf, which those formats cannot hold.
- E8M0: ml_dtypes turns 0 and negatives into NaN and torch drops the sign (-1 -> 1.0, 0 ->
  2^-127); ours raises. Overflow past 2^127 is NaN in both libraries, 2^127 with saturate=True.
  Both libraries round inputs in (2^-127, 2^-126) up to 2^-126 even when 2^-127 is nearer;
  ours returns the nearest (see test_e8m0_below_2_pow_minus_126_is_nearest_not_library).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.minifloat import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    E8M0,
    FORMATS,
    MiniFloat,
    decode,
    encode,
    get_format,
    max_value,
    values,
)

ML = {
    E4M3: ml_dtypes.float8_e4m3fn,
    E5M2: ml_dtypes.float8_e5m2,
    E3M2: ml_dtypes.float6_e3m2fn,
    E2M3: ml_dtypes.float6_e2m3fn,
    E2M1: ml_dtypes.float4_e2m1fn,
    E8M0: ml_dtypes.float8_e8m0fnu,
}
TORCH = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2, E8M0: torch.float8_e8m0fnu}
SIGNED = [E4M3, E5M2, E3M2, E2M3, E2M1]


def ml_codes(x: torch.Tensor, fmt: MiniFloat) -> torch.Tensor:
    return torch.from_numpy(x.numpy().astype(ML[fmt]).view(np.uint8).copy())


def ml_decode(codes: torch.Tensor, fmt: MiniFloat) -> torch.Tensor:
    return torch.from_numpy(codes.numpy().view(ML[fmt]).astype(np.float32))


def assert_same_floats(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal as floats, NaN where the other is NaN, and the same sign of zero."""
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    ok = ~torch.isnan(a)
    assert torch.equal(a[ok], b[ok])
    assert torch.equal(torch.signbit(a[ok]), torch.signbit(b[ok]))


def all_codes(fmt: MiniFloat) -> torch.Tensor:
    return torch.arange(1 << fmt.bits, dtype=torch.int64).to(torch.uint8)


# ---------------------------------------------------------------- decode: every code


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E8M0])
def test_every_code_decodes_like_torch(fmt: MiniFloat) -> None:
    codes = all_codes(fmt)
    assert_same_floats(decode(codes, fmt), codes.view(TORCH[fmt]).float())


@pytest.mark.parametrize("fmt", list(ML))
def test_every_code_decodes_like_ml_dtypes(fmt: MiniFloat) -> None:
    codes = all_codes(fmt)
    assert_same_floats(decode(codes, fmt), ml_decode(codes, fmt))


@pytest.mark.parametrize("fmt", list(ML))
def test_values_table_and_max(fmt: MiniFloat) -> None:
    ref = ml_decode(all_codes(fmt), fmt)
    ref = torch.unique(ref[torch.isfinite(ref)])  # sorted, -0 and 0 merged
    assert torch.equal(values(fmt), ref)
    assert max_value(fmt) == float(ml_dtypes.finfo(ML[fmt]).max)


def test_documented_constants() -> None:
    assert [max_value(f) for f in (E4M3, E5M2, E3M2, E2M3, E2M1)] == [448, 57344, 28, 7.5, 6]
    assert max_value(E8M0) == 2.0**127
    assert [f.emax for f in (E4M3, E5M2, E3M2, E2M3, E2M1, E8M0)] == [8, 15, 4, 2, 2, 127]
    fp4 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert values(E2M1).tolist() == sorted({s * v for v in fp4 for s in (1, -1)})
    assert decode(torch.tensor([0x7F, 0xFF], dtype=torch.uint8), E4M3).isnan().all()
    assert decode(torch.tensor([255], dtype=torch.uint8), E8M0).isnan().all()
    assert decode(torch.tensor([0, 127], dtype=torch.uint8), E8M0).tolist() == [2.0**-127, 1.0]


# ---------------------------------------------------------------- encode vs references


def tie_points(fmt: MiniFloat) -> torch.Tensor:
    """Exact midpoints between neighbouring values, and one float32 ulp either side."""
    v = values(fmt).double()
    mids = ((v[1:] + v[:-1]) / 2).float()
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    return torch.cat([mids, up, down])


def in_range_samples(fmt: MiniFloat, n: int = 4000) -> torch.Tensor:
    g = torch.Generator().manual_seed(fmt.bits * 100 + fmt.ebits)
    vmax = max_value(fmt)
    sub = 2.0 ** (1 - fmt.bias)  # smallest normal
    logs = torch.empty(n).uniform_(math.log2(sub) - fmt.mbits - 3, math.log2(vmax), generator=g)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    subnormals = torch.linspace(-sub, sub, 257)
    x = torch.cat([signs * torch.exp2(logs), subnormals, tie_points(fmt), values(fmt)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45])])
    return x[x.abs() <= vmax]


@pytest.mark.parametrize("fmt", SIGNED)
def test_encode_matches_ml_dtypes_in_range(fmt: MiniFloat) -> None:
    x = in_range_samples(fmt)
    codes, n_sat = encode(x, fmt)
    assert n_sat == 0
    assert torch.equal(codes, ml_codes(x, fmt))


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_encode_matches_torch_in_range(fmt: MiniFloat) -> None:
    x = in_range_samples(fmt)
    assert torch.equal(encode(x, fmt)[0], x.to(TORCH[fmt]).view(torch.uint8))


def test_e4m3_out_of_range() -> None:
    x = torch.tensor([449.0, 464.0, 465.0, -470.0, 1e6, -3e38])
    codes, n_sat = encode(x, E4M3, saturate=True)
    assert n_sat == 6  # every |x| > 448 counts, including 449 and 464 which round to 448 anyway
    assert decode(codes, E4M3).tolist() == [448, 448, 448, -448, 448, -448]
    assert torch.equal(codes, x.to(torch.float8_e4m3fn).view(torch.uint8))  # torch saturates too
    nosat, n = encode(x, E4M3, saturate=False)
    assert n == 0
    assert_same_floats(decode(nosat, E4M3), ml_decode(ml_codes(x, E4M3), E4M3))  # 465.. -> NaN


def test_e5m2_out_of_range() -> None:
    x = torch.tensor([60000.0, 61439.0, 61440.0, -70000.0, 3e38, math.inf, -math.inf])
    nosat, _ = encode(x, E5M2, saturate=False)
    assert torch.equal(nosat, ml_codes(x, E5M2))
    assert torch.equal(nosat, x.to(torch.float8_e5m2).view(torch.uint8))
    sat, n_sat = encode(x, E5M2, saturate=True)
    assert n_sat == 5  # inf is representable: it stays inf and is not counted
    assert decode(sat, E5M2).tolist() == [57344, 57344, 57344, -57344, 57344, math.inf, -math.inf]


@pytest.mark.parametrize("fmt", [E3M2, E2M3, E2M1])
def test_fp6_fp4_saturate_like_ml_dtypes(fmt: MiniFloat) -> None:
    vmax = max_value(fmt)
    x = torch.tensor([vmax * 1.01, -vmax * 1.2, vmax * 100, -3e38])
    codes, n_sat = encode(x, fmt)
    assert n_sat == 4
    assert torch.equal(codes, ml_codes(x, fmt))
    with pytest.raises(ValueError, match=f"{fmt.name}.*saturate=True"):
        encode(x, fmt, saturate=False)


def test_nan_goes_to_the_format_nan() -> None:
    x = torch.tensor([math.nan, 1.0])
    for fmt in (E4M3, E5M2, E8M0):
        assert decode(encode(x, fmt)[0], fmt)[0].isnan()
    assert encode(x, E4M3)[0][0] == x.to(torch.float8_e4m3fn).view(torch.uint8)[0]


@pytest.mark.parametrize("fmt", [E3M2, E2M3, E2M1])
def test_nan_and_inf_rejected_where_unrepresentable(fmt: MiniFloat) -> None:
    with pytest.raises(ValueError, match=f"{fmt.name} has no NaN"):
        encode(torch.tensor([math.nan]), fmt)
    with pytest.raises(ValueError, match=f"{fmt.name} has no inf"):
        encode(torch.tensor([math.inf]), fmt)


def test_e4m3_rejects_inf() -> None:
    with pytest.raises(ValueError, match="E4M3 has no inf"):
        encode(torch.tensor([-math.inf]), E4M3)


def test_e8m0_encode_matches_ml_dtypes() -> None:
    g = torch.Generator().manual_seed(8)
    logs = torch.empty(3000).uniform_(-126, 127, generator=g)
    k = torch.arange(-126, 127, dtype=torch.float64)
    # Linear midpoints between neighbouring powers of two: E8M0 has no mantissa bit to make
    # even, and both libraries send these ties up to the larger power; so do we.
    ties = (1.5 * torch.exp2(k[:-1])).float()
    x = torch.cat([torch.exp2(logs), ties, torch.exp2(k).float(), torch.tensor([2.0**-127])])
    codes, n_sat = encode(x, E8M0)
    assert n_sat == 0
    assert torch.equal(codes, ml_codes(x, E8M0))
    assert torch.equal(codes, x.to(torch.float8_e8m0fnu).view(torch.uint8))
    big = torch.tensor([2.0**127 * 1.5, 3e38])  # the tie at 1.5 * 2^127 rounds up: overflow
    assert torch.equal(encode(big, E8M0, saturate=False)[0], ml_codes(big, E8M0))  # NaN
    assert encode(big, E8M0)[0].tolist() == [254, 254]


def test_e8m0_below_2_pow_minus_126_is_nearest() -> None:
    # Between 2^-127 (code 0) and 2^-126 (code 1) float32 is subnormal. The libraries disagree
    # here from one machine to the next (on one, torch and ml_dtypes round every float32 above
    # 2^-127 up to 2^-126; on another, ml_dtypes rounds to nearest), so the reference is the
    # exact nearest power of two computed in float64; a tie goes up, as for the normal range.
    x = torch.tensor([1.25 * 2.0**-127, 1.49 * 2.0**-127, 1.5 * 2.0**-127, 1.75 * 2.0**-127])
    xd = x.double()
    lo, hi = 2.0**-127, 2.0**-126
    nearest = [0 if (v - lo) < (hi - v) else 1 for v in xd.tolist()]
    assert nearest == [0, 0, 1, 1]
    assert encode(x, E8M0)[0].tolist() == nearest
    tiny = torch.tensor([1e-45, 2.0**-128, 1.5 * 2.0**-128])
    assert encode(tiny, E8M0)[0].tolist() == [0, 0, 0] == ml_codes(tiny, E8M0).tolist()


def test_e8m0_rejects_zero_and_negative() -> None:
    with pytest.raises(ValueError, match="E8M0 holds only positive"):
        encode(torch.tensor([1.0, 0.0]), E8M0)
    with pytest.raises(ValueError, match="E8M0 holds only positive"):
        encode(torch.tensor([-2.0]), E8M0)


# ---------------------------------------------------------------- property: nearest, ties even


def oracle(x: float, fmt: MiniFloat) -> float:
    """Nearest value by brute force; a tie goes to the value with the even mantissa."""
    table = values(fmt).double().tolist()
    best = min(abs(x - v) for v in table)
    near = sorted({v for v in table if abs(x - v) == best})
    if len(near) == 1:
        return near[0]

    def mantissa(v: float) -> int:
        a = abs(v)
        if a < 2.0 ** (1 - fmt.bias):  # subnormal (or zero)
            return round(a / 2.0 ** (1 - fmt.bias - fmt.mbits))
        e = math.frexp(a)[1] - 1
        return round((a / 2.0**e - 1) * 2**fmt.mbits)

    (even,) = [v for v in near if mantissa(v) % 2 == 0]
    return even


@pytest.mark.parametrize("fmt", SIGNED)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_decode_encode_is_nearest_ties_to_even(fmt: MiniFloat, data: st.DataObject) -> None:
    vmax = max_value(fmt)
    pick = st.sampled_from(tie_points(fmt).tolist())
    anywhere = st.floats(-vmax, vmax, width=32, allow_subnormal=True)
    x = data.draw(st.one_of(anywhere, pick))
    got = decode(encode(torch.tensor([x], dtype=torch.float32), fmt)[0], fmt).item()
    assert got == oracle(x, fmt)


# ---------------------------------------------------------------- errors


def test_unknown_name_lists_allowed() -> None:
    assert get_format("e4m3") is E4M3
    with pytest.raises(ValueError, match="allowed: " + ", ".join(FORMATS)):
        get_format("E3M4")


def test_bad_codes_and_dtypes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        decode(torch.tensor([16], dtype=torch.uint8), E2M1)
    with pytest.raises(ValueError, match="integer codes"):
        decode(torch.tensor([1.0]), E2M1)
    with pytest.raises(ValueError, match="floating-point"):
        encode(torch.tensor([1]), E4M3)
