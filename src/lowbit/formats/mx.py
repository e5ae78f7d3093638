"""OCP Microscaling (MX v1.0) block formats and NVIDIA's NVFP4.

MX: blocks of `block` (32) consecutive elements along the last dimension share an E8M0 scale
X = 2^(floor(log2(amax)) - emax_elem) (or, on request, the smallest power of two that avoids
saturation; see ``mx_scale_exponents``), clamped to the E8M0 range [2^-127, 2^127]; each element
is x / X rounded to nearest-even in the element format, saturating to +-max. An all-zero block
gets the smallest scale, 2^-127 (code 0). MXINT8 elements are int8 two's complement with six
fractional bits (value k/64); they are clipped symmetrically to +-127/64, so the code -128
(-2.0) decodes but is never produced.

NVFP4: E2M1 elements, one E4M3 scale per 16 elements, one fp32 per-tensor scale
g = amax / (448 * 6); block scale s = e4m3(amax_block / (6 g)); elements = e2m1(x / (s g)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.grid_base import all_finite
from lowbit.formats.minifloat import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    E8M0,
    MiniFloat,
    decode,
    encode,
    max_value,
)

ELEMENTS: dict[str, MiniFloat | None] = {
    "fp8_e4m3": E4M3,
    "fp8_e5m2": E5M2,
    "fp6_e3m2": E3M2,
    "fp6_e2m3": E2M3,
    "fp4_e2m1": E2M1,
    "int8": None,  # MXINT8
}
INT8_FRAC_BITS = 6
INT8_MAX = 127 / 64
E8M0_BIAS = 127
NVFP4_BLOCK = 16
E4M3_MAX = max_value(E4M3)  # 448
E2M1_MAX = max_value(E2M1)  # 6


def _element(elem: str) -> MiniFloat | None:
    if elem not in ELEMENTS:
        raise ValueError(f"unknown MX element format {elem!r}; allowed: {', '.join(ELEMENTS)}")
    return ELEMENTS[elem]


def _check_input(x: Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what} needs a floating-point tensor, got {x.dtype}")
    if not all_finite(x):
        raise ValueError(f"{what} cannot hold NaN or inf input; the tensor contains some")


def _blocks(x: Tensor, block: int, what: str) -> Tensor:
    """View x as (..., n_blocks, block) over its last dimension."""
    n = x.shape[-1] if x.dim() else 1
    if block < 1 or n % block:
        divisors = [d for d in (8, 16, 32, 64, 128) if n % d == 0]
        raise ValueError(
            f"{what}: block size {block} does not divide the last dimension ({n}); "
            f"sizes that divide it: {divisors or 'none of 8, 16, 32, 64, 128'}"
        )
    return x.reshape(*x.shape[:-1], n // block, block)


def mx_scale_exponents(amax: Tensor, elem: str, rounding: str = "floor") -> Tensor:
    """Unbiased shared exponents, clamped to [-127, 127] (int64).

    ``floor`` is OCP MX v1.0's rule, floor(log2(amax)) - emax_elem: the block maximum lands in
    the element format's top binade and values above its largest finite value saturate (E2M1:
    (6, 8), E4M3: (448, 512) scale units). ``ceil`` takes the smallest power of two that fits
    amax within the largest finite value, so nothing saturates, at the cost of up to one
    binade of resolution. Both write the same E8M0 codes, so any MX decoder reads either.
    floor(log2) is read from the float's exponent (frexp), so an amax just below a power of
    two is not rounded up the way a float log2 would.
    """
    fmt = _element(elem)
    a = amax.to(torch.float64)
    if rounding == "floor":
        _, e = torch.frexp(a)
        exp = e.to(torch.int64) - 1 - (0 if fmt is None else fmt.emax)
    elif rounding == "ceil":
        top = INT8_MAX if fmt is None else max_value(fmt)
        m, e = torch.frexp(a / top)  # a / top = m * 2^e with m in [0.5, 1)
        exp = e.to(torch.int64) - (m == 0.5).to(torch.int64)  # exact powers of two stay
    else:
        raise ValueError(f"MX scale rounding is 'floor' (OCP MX v1.0) or 'ceil', not {rounding!r}")
    exp = torch.where(a > 0, exp, -E8M0_BIAS)
    return exp.clamp(-E8M0_BIAS, E8M0_BIAS)


def _mx_encode(x: Tensor, elem: str, block: int) -> tuple[Tensor, Tensor, int]:
    fmt = _element(elem)
    _check_input(x, f"MX {elem}")
    xb = _blocks(x.detach(), block, f"MX {elem}")
    exp = mx_scale_exponents(xb.abs().amax(dim=-1), elem)
    scaled = xb.to(torch.float64) * torch.exp2(-exp.to(torch.float64)).unsqueeze(-1)
    if fmt is None:
        n_saturated = int((scaled.abs() > INT8_MAX).sum())
        k = torch.round(scaled * (1 << INT8_FRAC_BITS)).clamp(-127, 127)
        codes = k.to(torch.int8)
    else:
        codes, n_saturated = encode(scaled, fmt, saturate=True)
    return codes.view(x.shape), (exp + E8M0_BIAS).to(torch.uint8), n_saturated


def mx_quantize(x: Tensor, elem: str, block: int = 32) -> tuple[Tensor, Tensor]:
    """MX-quantize x along its last dimension.

    Returns (element codes of x's shape: uint8 bit patterns, or int8 for "int8";
    E8M0 scale codes, uint8, shape (..., last_dim // block)).
    """
    codes, scales, _ = _mx_encode(x, elem, block)
    return codes, scales


def mx_count_saturated(x: Tensor, elem: str, block: int = 32) -> int:
    """Number of elements that mx_quantize clips: |x / X| above the element format's max."""
    return _mx_encode(x, elem, block)[2]


def mx_dequantize(codes: Tensor, scales: Tensor, elem: str, block: int = 32) -> Tensor:
    """float32 values of MX codes; a block whose scale is the E8M0 NaN (255) decodes to NaN."""
    fmt = _element(elem)
    cb = _blocks(codes, block, f"MX {elem}")
    if cb.shape[:-1] != scales.shape:
        raise ValueError(f"MX scales have shape {tuple(scales.shape)}, expected {cb.shape[:-1]}")
    if fmt is None:
        if codes.dtype != torch.int8:
            raise ValueError(f"MXINT8 codes must be int8, got {codes.dtype}")
        elems = cb.to(torch.float64) / (1 << INT8_FRAC_BITS)
    else:
        elems = decode(cb, fmt).to(torch.float64)
    x = elems * decode(scales, E8M0).to(torch.float64).unsqueeze(-1)
    return x.to(torch.float32).view(codes.shape)


def mx_bits_per_weight(elem: str, block: int = 32) -> float:
    """Element bits + 8 scale bits per block (MXFP4: 4.25, MXFP6: 6.25, MXFP8/MXINT8: 8.25)."""
    fmt = _element(elem)
    return (8 if fmt is None else fmt.bits) + 8 / block


def _nvfp4_encode(x: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor, int]:
    _check_input(x, "NVFP4")
    xb = _blocks(x.detach(), block, "NVFP4").to(torch.float64)
    amax = float(xb.abs().max()) if xb.numel() else 0.0
    g = torch.tensor(amax / (E4M3_MAX * E2M1_MAX) if amax > 0 else 1.0, dtype=torch.float32)
    gd = g.double()
    scales, _ = encode(xb.abs().amax(dim=-1) / (E2M1_MAX * gd), E4M3, saturate=True)
    denom = decode(scales, E4M3).to(torch.float64).unsqueeze(-1) * gd
    # A block scale that rounds to 0 means every element of the block rounds to 0 as well.
    scaled = torch.where(denom > 0, xb / torch.where(denom > 0, denom, 1.0), 0.0)
    codes, n_saturated = encode(scaled, E2M1, saturate=True)
    return codes.view(x.shape), scales, g, n_saturated


def nvfp4_quantize(x: Tensor, block: int = NVFP4_BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """NVFP4-quantize x along its last dimension.

    Returns (E2M1 codes, uint8 of x's shape; E4M3 block-scale codes, uint8, shape
    (..., last_dim // block); fp32 scalar per-tensor scale g = amax / 2688, or 1 if x is 0).
    """
    codes, scales, g, _ = _nvfp4_encode(x, block)
    return codes, scales, g


def nvfp4_count_saturated(x: Tensor, block: int = NVFP4_BLOCK) -> int:
    """Number of elements clipped to +-6 (possible when a block scale rounds down in E4M3)."""
    return _nvfp4_encode(x, block)[3]


def nvfp4_dequantize(
    codes: Tensor, scales: Tensor, global_scale: Tensor, block: int = NVFP4_BLOCK
) -> Tensor:
    """float32 values: e2m1(code) * e4m3(block scale) * global scale."""
    cb = _blocks(codes, block, "NVFP4")
    if cb.shape[:-1] != scales.shape:
        raise ValueError(f"NVFP4 scales have shape {tuple(scales.shape)}, expected {cb.shape[:-1]}")
    s = decode(scales, E4M3).to(torch.float64).unsqueeze(-1) * global_scale.double()
    return (decode(cb, E2M1).to(torch.float64) * s).to(torch.float32).view(codes.shape)


def nvfp4_bits_per_weight(numel: int | None = None, block: int = NVFP4_BLOCK) -> float:
    """4 element bits + 8 bits per block (4.5 at 16) + the fp32 tensor scale spread over numel."""
    return 4 + 8 / block + (32 / numel if numel else 0.0)
