"""Small binary floating-point formats (FP8, FP6, FP4 elements and the E8M0 scale).

Every format here has at most 256 bit patterns, so encoding is done against the exact table of
representable magnitudes: the input is compared in float64 (exact for float32 input) with the
midpoints between neighbouring table entries, and an exact midpoint goes to the neighbour with
the even code, which is the one with the even mantissa (IEEE round-to-nearest-even). E8M0 has
no mantissa bits to make even; its ties go to the larger power of two, as torch and ml_dtypes do.

Codes are the format's bit patterns in a uint8: sign bit on top (signed formats), then the
exponent field, then the mantissa field, right-aligned (E2M1 uses codes 0..15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch import Tensor

NanRule = Literal["ieee", "all_ones", "none"]


@dataclass(frozen=True)
class MiniFloat:
    """A binary float format of at most 8 bits.

    nan: "ieee" - the all-ones exponent field holds inf (mantissa 0) and NaNs (E5M2);
         "all_ones" - only the all-ones magnitude pattern is NaN, there is no inf (E4M3, E8M0);
         "none" - every pattern is a finite number (E3M2, E2M3, E2M1).
    signed=False drops the sign bit. subnormals=False makes exponent field 0 an ordinary binade
    (E8M0: code 0 is 2**-127 and there is no zero).
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    nan: NanRule = "none"
    signed: bool = True
    subnormals: bool = True

    def __post_init__(self) -> None:
        if self.ebits < 1 or self.mbits < 0 or self.bits > 8:
            raise ValueError(f"{self.name}: need ebits >= 1, mbits >= 0 and at most 8 bits")
        if self.nan not in ("ieee", "all_ones", "none"):
            raise ValueError(f"{self.name}: nan must be 'ieee', 'all_ones' or 'none'")

    @property
    def bits(self) -> int:
        """Total width in bits."""
        return int(self.signed) + self.ebits + self.mbits

    @property
    def has_inf(self) -> bool:
        return self.nan == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.nan != "none"

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value (E4M3: 8, E5M2: 15, E2M1: 2, E8M0: 127)."""
        return math.frexp(max_value(self))[1] - 1

    def __str__(self) -> str:
        return self.name


E4M3 = MiniFloat("E4M3", 4, 3, 7, nan="all_ones")  # OCP FP8 "E4M3FN": max 448, S.1111.111 = NaN
E5M2 = MiniFloat("E5M2", 5, 2, 15, nan="ieee")  # IEEE-like: inf and NaNs, max 57344
E3M2 = MiniFloat("E3M2", 3, 2, 3)  # OCP FP6, max 28
E2M3 = MiniFloat("E2M3", 2, 3, 1)  # OCP FP6, max 7.5
E2M1 = MiniFloat("E2M1", 2, 1, 1)  # OCP FP4, max 6
E8M0 = MiniFloat("E8M0", 8, 0, 127, nan="all_ones", signed=False, subnormals=False)

FORMATS: dict[str, MiniFloat] = {f.name: f for f in (E4M3, E5M2, E3M2, E2M3, E2M1, E8M0)}


def get_format(name: str | MiniFloat) -> MiniFloat:
    """Look a format up by name ("E4M3", case-insensitive); a MiniFloat passes through."""
    if isinstance(name, MiniFloat):
        return name
    fmt = FORMATS.get(str(name).upper())
    if fmt is None:
        raise ValueError(f"unknown float format {name!r}; allowed: {', '.join(FORMATS)}")
    return fmt


def _pattern_value(fmt: MiniFloat, code: int) -> float:
    """Value of a magnitude pattern by the plain formula, ignoring inf/NaN rules."""
    e, m = code >> fmt.mbits, code & ((1 << fmt.mbits) - 1)
    if e == 0 and fmt.subnormals:
        return m * 2.0 ** (1 - fmt.bias - fmt.mbits)
    return ((1 << fmt.mbits) + m) * 2.0 ** (e - fmt.bias - fmt.mbits)


@cache
def _tables(fmt: MiniFloat) -> tuple[Tensor, float, int, int]:
    """(finite magnitudes in code order plus the first value past max, max, inf code, NaN code).

    Codes are magnitude codes (no sign bit); -1 marks a format without inf or NaN.
    """
    n_mag = 1 << (fmt.ebits + fmt.mbits)
    if fmt.nan == "ieee":
        n_finite = n_mag - (1 << fmt.mbits)  # the all-ones exponent field is special
        inf_code, nan_code = n_finite, n_mag - 1
    elif fmt.nan == "all_ones":
        n_finite, inf_code, nan_code = n_mag - 1, -1, n_mag - 1
    else:
        n_finite, inf_code, nan_code = n_mag, -1, -1
    # Index n_finite holds the value the next pattern would have with an unbounded exponent:
    # rounding to it means overflow.
    mags = torch.tensor([_pattern_value(fmt, c) for c in range(n_finite + 1)], dtype=torch.float64)
    return mags, float(mags[n_finite - 1]), inf_code, nan_code


@cache
def _decode_table(fmt: MiniFloat) -> Tensor:
    mags, _, inf_code, nan_code = _tables(fmt)
    n_mag = 1 << (fmt.ebits + fmt.mbits)
    table = torch.full((n_mag,), float("nan"), dtype=torch.float64)
    table[: mags.numel() - 1] = mags[:-1]
    if inf_code >= 0:
        table[inf_code] = float("inf")
    if nan_code >= 0:
        table[nan_code] = float("nan")
    if fmt.signed:
        table = torch.cat([table, -table])
    return table.to(torch.float32)


def max_value(fmt: MiniFloat | str) -> float:
    """Largest finite value of the format."""
    return _tables(get_format(fmt))[1]


def values(fmt: MiniFloat | str) -> Tensor:
    """All finite representable values, sorted ascending, zero once (float32)."""
    fmt = get_format(fmt)
    mags = _tables(fmt)[0][:-1]
    if fmt.signed:
        mags = torch.cat([-mags[1:].flip(0), mags])
    return mags.to(torch.float32)


def encode(x: Tensor, fmt: MiniFloat | str, saturate: bool = True) -> tuple[Tensor, int]:
    """Round float input to the format's codes (uint8) with round-to-nearest-even.

    saturate=True: finite values with |x| > max become +-max; they are counted in the returned
    n_saturated. saturate=False: a value that rounds past max becomes inf (E5M2) or NaN (E4M3,
    E8M0); formats with neither raise ValueError. NaN input becomes the format's NaN and inf the
    format's inf; a format without them raises ValueError. E8M0 is unsigned and has no zero:
    zero or negative input raises ValueError, and values below 2**-127 round to 2**-127.
    """
    fmt = get_format(fmt)
    if not x.is_floating_point():
        raise ValueError(f"encode to {fmt.name} needs a floating-point tensor, got {x.dtype}")
    mags, vmax, inf_code, nan_code = _tables(fmt)
    xd = x.detach().to(torch.float64)
    mags = mags.to(xd.device)
    is_nan, is_inf = torch.isnan(xd), torch.isinf(xd)
    if not fmt.has_nan and bool(is_nan.any()):
        raise ValueError(f"{fmt.name} has no NaN encoding; the input contains NaN")
    if not fmt.has_inf and bool(is_inf.any()):
        raise ValueError(f"{fmt.name} has no inf encoding; the input contains inf")
    if not fmt.signed and bool(((xd <= 0) & ~is_nan).any()):
        raise ValueError(f"{fmt.name} holds only positive values; the input has zero or negatives")

    a = torch.where(is_nan, 0.0, xd.abs())
    top = mags.numel() - 1  # index of the overflow value
    hi = torch.searchsorted(mags, a).clamp_(max=top)
    lo = (hi - 1).clamp_(min=0)
    mid = (mags[lo] + mags[hi]) / 2
    # A tie goes to the even code (even mantissa); with no mantissa bits (E8M0) it goes up.
    tie_up = hi % 2 == 0 if fmt.mbits else torch.ones_like(hi, dtype=torch.bool)
    code = torch.where((a > mid) | ((a == mid) & tie_up), hi, lo)

    n_saturated = 0
    over = a > vmax
    if saturate:
        over &= ~is_inf
        n_saturated = int(over.sum())
        code = torch.where(over, top - 1, code)
    elif bool((code == top).any()):
        if fmt.has_inf:
            code = torch.where(code == top, inf_code, code)
        elif fmt.has_nan:
            code = torch.where(code == top, nan_code, code)
        else:
            raise ValueError(
                f"{fmt.name} has neither inf nor NaN: values beyond +-{vmax:g} need saturate=True"
            )
    if fmt.has_inf:
        code = torch.where(is_inf, inf_code, code)
    code = torch.where(is_nan, nan_code, code)
    if fmt.signed:
        code = code | (torch.signbit(xd).to(torch.int64) << (fmt.ebits + fmt.mbits))
    return code.to(torch.uint8), n_saturated


def decode(codes: Tensor, fmt: MiniFloat | str) -> Tensor:
    """Values (float32) of the format's codes; NaN/inf patterns decode to NaN/inf."""
    fmt = get_format(fmt)
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"decode from {fmt.name} needs integer codes, got {codes.dtype}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << fmt.bits):
        raise ValueError(f"{fmt.name} codes must lie in [0, {(1 << fmt.bits) - 1}]")
    return _decode_table(fmt).to(c.device)[c]
