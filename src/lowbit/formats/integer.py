"""Integer affine quantization: parameters, codes, dequantization. No model knowledge.

Codes are unsigned, q in [0, 2^b - 1], and ``x_hat = scale * (q - zero)``. A symmetric
scheme has the fixed zero point 2^(b-1) and ``scale = absmax / ((2^b - 1) / 2)``: all 2^b
levels are used and both extremes land within s/2 (the convention of GPTQ and
compressed-tensors). An asymmetric scheme stores an integer zero point per group.
"""

from __future__ import annotations

import torch

from lowbit.scheme import Scheme

_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _round_scale_up(scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round scales to their storage dtype, upward, so no value is clipped by the rounding."""
    tdt = _SCALE_DTYPES[dtype]
    tiny = 2.0**-24 if tdt == torch.float16 else 1e-30
    scale = scale.clamp(min=tiny)
    stored = scale.to(tdt)
    low = stored.float() < scale
    if low.any():
        stored = torch.where(
            low, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored
        )
    return stored.float()


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, scale_dtype: str = "float16"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float tensors of the same shape) covering [xmin, xmax]."""
    qmax = (1 << bits) - 1
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        scale = _round_scale_up(absmax / (qmax / 2), scale_dtype)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    # the zero point is stored as a b-bit code, so the range must contain 0
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    span = xmax - xmin
    span = torch.where(span == 0, torch.ones_like(span), span)
    scale = _round_scale_up(span / qmax, scale_dtype)
    zero = torch.round(-xmin / scale).clamp(0, qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q = clamp(round(x / scale) + zero, 0, 2^b - 1), as float (exact small integers)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, (1 << bits) - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero, bits), scale, zero)


def fit_qparams(
    w: torch.Tensor,
    scheme: Scheme,
    weight: torch.Tensor | None = None,
    grid: int = 80,
    max_shrink: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w`` (rows, n): shape (rows, 1).

    ``clip="minmax"`` covers each row's range; ``clip="mse"`` shrinks the range by factors
    in [1 - max_shrink, 1] and keeps, per row, the factor with the lowest squared error,
    optionally weighted by ``weight`` (broadcastable to ``w``), e.g. the Hessian diagonal.
    """
    w = w.float()
    xmin = w.min(dim=1, keepdim=True).values
    xmax = w.max(dim=1, keepdim=True).values
    scale, zero = qparams_from_range(xmin, xmax, scheme.bits, scheme.symmetric, scheme.scale_dtype)
    if scheme.clip == "minmax":
        return scale, zero
    cw = torch.ones(1) if weight is None else weight.float().clamp(min=0)

    def err(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (((fake_quantize(w, s, z, scheme.bits) - w) ** 2) * cw).sum(1, keepdim=True)

    best = err(scale, zero)
    for i in range(1, grid + 1):
        p = 1 - max_shrink * i / grid
        s, z = qparams_from_range(
            p * xmin, p * xmax, scheme.bits, scheme.symmetric, scheme.scale_dtype
        )
        e = err(s, z)
        better = e < best
        best = torch.where(better, e, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def group_view(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """(out, in) -> (out * groups, group) rows that share one scale; tensor -> (1, out*in)."""
    out_f, in_f = w.shape
    if scheme.granularity == "tensor":
        return w.reshape(1, -1)
    if scheme.granularity == "channel":
        return w
    g = scheme.groups(in_f)
    return w.reshape(out_f * g, in_f // g)


def fit_weight(
    w: torch.Tensor, scheme: Scheme, col_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group parameters for a whole (out, in) weight: scale, zero of shape (out, groups).

    ``col_weight`` (in,) weights each input column's squared error in the MSE search.
    """
    out_f, in_f = w.shape
    cw = None
    if col_weight is not None:
        cw = group_view(col_weight.float().expand(out_f, in_f), scheme)
    scale, zero = fit_qparams(group_view(w.float(), scheme), scheme, cw)
    if scheme.granularity == "tensor":
        return scale.expand(out_f, 1).clone(), zero.expand(out_f, 1).clone()
    return scale.reshape(out_f, -1), zero.reshape(out_f, -1)


def column_groups(in_features: int, scheme: Scheme) -> torch.Tensor:
    """The group index of every input column (the default ``g_idx``)."""
    if scheme.granularity != "group":
        return torch.zeros(in_features, dtype=torch.int32)
    scheme.groups(in_features)
    return (torch.arange(in_features) // scheme.group_size).to(torch.int32)
