"""HQQ (Badri & Shaji, 2023): half-quadratic fitting of integer affine weight parameters.

Pure tensor math, no model knowledge, no calibration data. Each row of ``w`` (rows, n) gets
one ``(scale, zero)`` in lowbit's integer convention (``lowbit.formats.integer``): codes
``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, ``w_hat = scale * (q - zero)``, scales
holding fp16 values, zero points integers in ``[0, 2^b - 1]`` (fixed at ``2^(b-1)`` when
symmetric).

The objective is HQQ's robust ``sum c |w - w_hat|^p`` (``p = lp_norm`` < 1, ``c`` an optional
non-negative weight). Half-quadratic splitting introduces ``W_e`` ~ ``w - w_hat`` and
alternates, per row and vectorised over all rows:

1. codes ``q`` by rounding (the exact minimiser for fixed parameters);
2. ``W_e = shrink_p(w - w_hat, beta)``, the proximal step of ``|.|^p`` (a generalised soft
   threshold: large residuals pass into ``W_e`` and stop pulling the fit, small ones vanish);
3. a closed-form (weighted) least-squares fit of the parameters to ``w - W_e`` given ``q``;

with ``beta`` multiplied by ``kappa`` after every iteration and each row keeping the
parameters of its lowest objective (an iteration that improves no row stops the loop).

HQQ's own zero point is a float. Here it must be an integer, and an integer zero only picks
which ``2^b`` levels of the lattice ``scale * Z`` are used: the grid always contains 0, so the
only continuous freedom left is the scale. The asymmetric fit therefore (a) runs HQQ with a
float zero *and* a free scale, (b) tries the two integer neighbours of that zero, each with
its own scale-only HQQ refinement (``zero_mode="search"``), (c) rounds the scale to the
fp16 neighbour with the lower objective, and (d) never returns anything worse than the
min-max start. ``zero_mode`` selects the other integer strategies that were measured
(``benchmarks/hqq_probe.py``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lowbit.formats.integer import dequantize, qparams_from_range, quantize

ZeroMode = Literal["round", "refit", "search", "integer"]
_TINY = 1e-30


class HQQFit(NamedTuple):
    """Result of :func:`hqq_fit`; every tensor has shape (rows, 1), float32."""

    scale: Tensor  # fp16-representable values (when scale_dtype is float16)
    zero: Tensor  # integers in [0, 2^b - 1]
    error: Tensor  # sum_j c_j |w_j - w_hat_j|^p with the returned (stored) parameters
    start_error: Tensor  # the same objective for the min-max start


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Proximal step of ``|e|^p / beta`` (generalised soft threshold, HQQ's ``shrink``):
    ``sign(x) * max(|x| - |x|^(p-1) / beta, 0)``; ``p = 1`` is the ordinary soft threshold."""
    ax = x.abs()
    if p == 1:
        return torch.sign(x) * torch.relu(ax - 1.0 / beta)
    # x * max(1 - |x|^(p-2) / beta, 0): no division by zero at x == 0 and one pow only
    return x * torch.relu(1.0 - ax.pow(p) / (beta * ax * ax + _TINY))


def lp_error(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, p: float, weight: Tensor | None = None
) -> Tensor:
    """Per-row ``sum c |w - dequantize(quantize(w))|^p`` (rows, 1), through lowbit's own
    ``quantize`` / ``dequantize`` (so it is exactly the error of the stored parameters)."""
    r = w - dequantize(quantize(w, scale, zero, bits), scale, zero)
    return _objective(r, p, weight)


def _objective(r: Tensor, p: float, c: Tensor | None) -> Tensor:
    a = r.abs()
    a = a * a if p == 2 else (a if p == 1 else a.pow(p))
    if c is not None:
        a = a * c
    return a.sum(1, keepdim=True)


def _wsum(x: Tensor, c: Tensor | None) -> Tensor:
    return (x if c is None else x * c).sum(1, keepdim=True)


def _fp16_neighbours(s: Tensor) -> tuple[Tensor, Tensor]:
    """The fp16 values just below and just above (or equal to) each positive ``s``."""
    s = s.clamp(min=2.0**-24, max=65504.0)
    near = s.to(torch.float16)
    up = torch.where(near.float() < s, torch.nextafter(near, torch.full_like(near, torch.inf)),
                     near)
    down = torch.where(near.float() > s, torch.nextafter(near, torch.zeros_like(near)), near)
    return down.float(), up.float()


class _Ctx(NamedTuple):
    w: Tensor
    c: Tensor | None
    qmax: int
    p: float  # objective norm
    iters: int
    beta: float
    kappa: float
    scale_only_units: bool  # shrink in units of the scale (code steps) instead of weights


def _shrink(ctx: _Ctx, r: Tensor, s: Tensor, beta: float) -> Tensor:
    if ctx.scale_only_units:
        return shrink_lp(r / s, beta, ctx.p) * s
    return shrink_lp(r, beta, ctx.p)


def _scale_only(ctx: _Ctx, s: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """HQQ over the scale with fixed integer zeros ``z``: returns (best scale, its objective)."""
    w, c = ctx.w, ctx.c
    beta = ctx.beta
    best_s = s
    best = torch.full_like(s, torch.inf)
    for _ in range(ctx.iters):
        q = torch.clamp(torch.round(w / s) + z, 0, ctx.qmax)
        d = q - z
        r = w - s * d
        obj = _objective(r, ctx.p, c)
        better = obj < best
        if not better.any():
            break
        best = torch.where(better, obj, best)
        best_s = torch.where(better, s, best_s)
        t = w - _shrink(ctx, r, s, beta)
        num, den = _wsum(d * t, c), _wsum(d * d, c)
        s_new = num / den.clamp(min=_TINY)
        s = torch.where((den > 0) & (s_new > 0), s_new, s)
        beta *= ctx.kappa
    return best_s, best


def _float_phase(
    ctx: _Ctx, s: Tensor, z: Tensor, opt_scale: bool, integer: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """HQQ with a float (or, ``integer``, a rounded-every-step) zero and optionally the scale:
    returns the best (scale, zero, objective) per row."""
    w, c, qmax = ctx.w, ctx.c, ctx.qmax
    beta = ctx.beta
    best_s, best_z = s, z
    best = torch.full_like(s, torch.inf)
    sc = None if c is None else _wsum(torch.ones_like(w), c).clamp(min=_TINY)
    n = w.shape[1]
    for _ in range(ctx.iters):
        q = torch.clamp(torch.round(w / s + z), 0, qmax)
        r = w - s * (q - z)
        obj = _objective(r, ctx.p, c)
        better = obj < best
        if not better.any():
            break
        best = torch.where(better, obj, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        t = w - _shrink(ctx, r, s, beta)
        tot = sc if c is not None else torch.full_like(s, float(n))
        mq, mt = _wsum(q, c) / tot, _wsum(t, c) / tot
        if opt_scale:
            dq = q - mq
            den = _wsum(dq * dq, c)
            a = _wsum(dq * (t - mt), c) / den.clamp(min=_TINY)
            ok = (den > 0) & (a > 0)
            s_new = torch.where(ok, a, s)
        else:
            s_new = s
        # w - W_e ~ s (q - z)  =>  z = mean(q) - mean(t) / s
        z_new = mq - mt / s_new
        if integer:
            z_new = torch.round(z_new).clamp(0, qmax)
            dz = q - z_new
            den = _wsum(dz * dz, c)
            s_fit = _wsum(dz * t, c) / den.clamp(min=_TINY)
            s_new = torch.where((den > 0) & (s_fit > 0), s_fit, s_new) if opt_scale else s_new
        s, z = s_new, z_new
        beta *= ctx.kappa
    return best_s, best_z, best


def hqq_fit(
    w: Tensor,
    bits: int,
    symmetric: bool = False,
    scale_dtype: str = "float16",
    weight: Tensor | None = None,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    *,
    zero_mode: ZeroMode = "search",
    opt_scale: bool = True,
    code_units: bool = False,
    select_norm: float | None = None,
) -> HQQFit:
    """HQQ parameters for every row of ``w`` (rows, n), with the objective they reach.

    ``select_norm`` (default ``lp_norm``) is the norm by which each row keeps its best
    iterate; ``code_units`` applies the shrinkage to residuals measured in scale steps.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"HQQ integer grids take 2..8 bits, not {bits}")
    if w.dim() != 2:
        raise ValueError(f"w must be (rows, n), not {tuple(w.shape)}")
    w = w.float()
    c = None
    if weight is not None:
        c = weight.float().clamp(min=0).expand_as(w)
    qmax = (1 << bits) - 1
    p = lp_norm if select_norm is None else select_norm
    ctx = _Ctx(w, c, qmax, p, iters, beta, kappa, code_units)
    xmin = w.min(1, keepdim=True).values
    xmax = w.max(1, keepdim=True).values
    s0, z0 = qparams_from_range(xmin, xmax, bits, symmetric, scale_dtype)
    start = lp_error(w, s0, z0, bits, p, c)

    if symmetric:
        s, _ = _scale_only(ctx, s0, z0) if opt_scale else (s0, start)
        z = z0
    elif zero_mode == "integer":
        s, z, _ = _float_phase(ctx, s0, z0, opt_scale, integer=True)
    else:
        sf, zf, _ = _float_phase(ctx, s0, z0, opt_scale, integer=False)
        if zero_mode == "round":
            s, z = sf, torch.round(zf).clamp(0, qmax)
        elif zero_mode == "refit":
            z = torch.round(zf).clamp(0, qmax)
            s, _ = _scale_only(ctx, sf, z)
        elif zero_mode == "search":
            z_lo = torch.floor(zf).clamp(0, qmax)
            z_hi = (z_lo + 1).clamp(max=qmax)
            k = w.shape[0]
            ctx2 = ctx._replace(w=w.repeat(2, 1), c=None if c is None else c.repeat(2, 1))
            s2, e2 = _scale_only(ctx2, sf.repeat(2, 1), torch.cat([z_lo, z_hi]))
            hi = e2[k:] < e2[:k]
            s = torch.where(hi, s2[k:], s2[:k])
            z = torch.where(hi, z_hi, z_lo)
        else:
            raise ValueError(f"zero_mode must be round, refit, search or integer: {zero_mode!r}")

    # store the scale: the fp16 neighbour (below or above) with the lower objective
    if scale_dtype == "float16":
        lo, hi_ = _fp16_neighbours(s)
        e_lo, e_hi = lp_error(w, lo, z, bits, p, c), lp_error(w, hi_, z, bits, p, c)
        s = torch.where(e_hi <= e_lo, hi_, lo)
        err = torch.minimum(e_lo, e_hi)
    else:
        s = s.clamp(min=_TINY)
        err = lp_error(w, s, z, bits, p, c)
    # never worse than the min-max start
    keep = start <= err
    s = torch.where(keep, s0, s)
    z = torch.where(keep, z0, z)
    err = torch.where(keep, start, err)
    return HQQFit(s, z, err, start)


def hqq_qparams(
    w: Tensor,
    bits: int,
    symmetric: bool = False,
    scale_dtype: str = "float16",
    weight: Tensor | None = None,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    **kw,
) -> tuple[Tensor, Tensor]:
    """(scale, zero) of shape (rows, 1) for :func:`lowbit.formats.integer.quantize`; see
    :func:`hqq_fit` for the options and the objective reached."""
    f = hqq_fit(w, bits, symmetric, scale_dtype, weight, iters, lp_norm, beta, kappa, **kw)
    return f.scale, f.zero
