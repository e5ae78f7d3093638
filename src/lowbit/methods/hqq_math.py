"""HQQ (Badri & Shaji, 2023): half-quadratic fitting of integer affine weight parameters.

Pure tensor math, no model knowledge, no calibration data. Each row of ``w`` (rows, n) gets
one ``(scale, zero)`` in lowbit's integer convention (``lowbit.formats.integer``): codes
``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, ``w_hat = scale * (q - zero)``, scales
holding fp16 values, zero points integers in ``[0, 2^b - 1]`` (``2^(b-1)`` when symmetric).

The objective is HQQ's ``sum_j c_j |w_j - w_hat_j|^p`` (``p = lp_norm``, ``c`` an optional
non-negative weight). Half-quadratic splitting introduces ``W_e ~ w - w_hat`` and alternates,
vectorised over all rows: (1) codes by rounding, (2) ``W_e = shrink_p(w - w_hat, beta)``, the
generalised soft threshold of ``|.|^p`` (large residuals pass into ``W_e`` and stop pulling the
fit), (3) the closed-form least-squares parameters given the codes and the target ``w - W_e``;
``beta`` grows by ``kappa`` per iteration and a row stops at its first iteration that does
not lower its objective (HQQ's early stop, per row), keeping its best parameters.

HQQ's zero point is a float; ours is an integer, which only chooses which ``2^b`` levels of
the lattice ``scale * Z`` are used: the grid always holds 0 and the scale is the one continuous
freedom left. Measured on SmolLM2-135M (``benchmarks/hqq_probe.py``), letting an ``l_p``
objective (p < 2, and even p = 2) move that scale freely buys a lower weight error by
*clipping* each group's extreme weights, and perplexity gets much worse. The default therefore
admits only parameters that keep every weight within half a step of the grid, as min-max does
(``clip=False``). Under that constraint each integer zero ``z`` has a smallest scale,
``s_min(z) = max(-lo / (z + 1/2), hi / (2^b - 1 - z + 1/2))`` for a row's range ``[lo, hi]``.
The fit scans the zero minimising ``s_min`` and its two neighbours, each at ``scan`` multiples
of its ``s_min``, then runs the half-quadratic loop on the scale with the zero fixed (the scale
projected back onto ``s >= s_min(z)``), stores the fp16 neighbour of the scale with the lower
objective, and never returns anything worse than the min-max start.

Running HQQ as published (a float zero, fitted with the scale fixed) and then rounding the
zero to an integer, rounding and refitting the scale, or searching both integer neighbours
was measured (BENCHMARKS.md) and lost to the fixed-zero fit; those variants were removed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lowbit.formats.integer import dequantize, qparams_from_range, quantize

_TINY = 1e-30
_TOL = 1e-5  # slack, in scale steps, of the half-step (no clipping) test


class HQQFit(NamedTuple):
    """Result of :func:`hqq_fit`; every tensor has shape (rows, 1), float32."""

    scale: Tensor  # fp16-representable values (when scale_dtype is float16)
    zero: Tensor  # integers in [0, 2^b - 1]
    error: Tensor  # sum_j c_j |w_j - w_hat_j|^p with the returned (stored) parameters
    start_error: Tensor  # the same objective for the min-max start


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """HQQ's generalised soft threshold for ``|e|^p`` with coupling ``beta``:
    ``sign(x) * max(|x| - |x|^(p-1) / beta, 0)`` (``p = 1``: the ordinary soft threshold)."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return _shrink_from(x, _pow(x.abs(), p), beta)


def _shrink_from(r: Tensor, rp: Tensor, beta: float) -> Tensor:
    # r * max(1 - |r|^(p-2) / beta, 0) given rp = |r|^p: one expression, no 0 / 0 at r == 0
    return r * torch.relu(1.0 - rp / (beta * r * r + _TINY))


def _pow(a: Tensor, p: float) -> Tensor:
    """``a ** p`` for ``a >= 0``; exp(p log a) is several times faster than ``pow`` on CPU."""
    if p == 2:
        return a * a
    if p == 1:
        return a
    return torch.log(a).mul_(p).exp_()


def _wsum(x: Tensor, c: Tensor | None) -> Tensor:
    return (x if c is None else x * c).sum(1, keepdim=True)


def lp_error(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, p: float, weight: Tensor | None = None
) -> Tensor:
    """Per-row ``sum c |w - dequantize(quantize(w))|^p`` (rows, 1), through lowbit's own
    ``quantize`` / ``dequantize``: exactly the error of stored parameters."""
    r = w - dequantize(quantize(w, scale, zero, bits), scale, zero)
    return _wsum(_pow(r.abs(), p), weight)


def smallest_scale(zero: Tensor, lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """The smallest scale at which zero point ``zero`` keeps ``[lo, hi]`` within half a step
    of the grid ``scale * ([0, 2^b - 1] - zero)`` (no clipping beyond rounding)."""
    qmax = (1 << bits) - 1
    return torch.maximum(-lo / (zero + 0.5), hi / (qmax - zero + 0.5))


def _admissible(s: Tensor, z: Tensor, lo: Tensor, hi: Tensor, qmax: int) -> Tensor:
    # no weight beyond half a step from the grid's ends; monotone in s for a fixed zero
    return (lo / s >= -z - 0.5 - _TOL) & (hi / s <= qmax - z + 0.5 + _TOL)


def _fp16_neighbours(s: Tensor) -> tuple[Tensor, Tensor]:
    """The fp16 values just below and just above (or equal to) each positive ``s``."""
    s = s.clamp(min=2.0**-24, max=65504.0)
    near = s.to(torch.float16)
    inf = torch.full_like(near, torch.inf)
    up = torch.where(near.float() < s, torch.nextafter(near, inf), near)
    down = torch.where(near.float() > s, torch.nextafter(near, torch.zeros_like(near)), near)
    return down.float(), up.float()


class _Opt(NamedTuple):
    bits: int
    qmax: int
    p: float
    iters: int
    beta: float
    kappa: float
    clip: bool  # admit clipping beyond half a step


def _scan(
    w: Tensor, c: Tensor | None, o: _Opt, refs: list[tuple[Tensor, Tensor | None]],
    factors: list[float], lo: Tensor, hi: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Best (scale, zero, objective) per row over ``scale = ref * f`` for each ``(ref, zero)``
    in ``refs`` and f in ``factors`` (a zero of None: the two integers nearest to centring the
    grid on ``[lo, hi]``). Errors in scale steps: ``w - s (q - z) = s (v - d)``, ``v = w / s``,
    ``d = clamp(round(v), -z, qmax - z)``."""
    best = torch.full_like(lo, torch.inf)
    bs, bz = torch.ones_like(lo), torch.zeros_like(lo)
    for ref, z_ref in refs:
        u = w / ref
        for f in factors:
            s = ref * f
            v = u / f
            x = torch.round(v)
            if z_ref is None:
                zc = torch.floor(o.qmax / 2 - (lo + hi) / (2 * s))
                zs = [zc.clamp(0, o.qmax), (zc + 1).clamp(0, o.qmax)]
            else:
                zs = [z_ref]
            for z in zs:
                d = torch.maximum(torch.minimum(x, o.qmax - z), -z)
                e = _wsum(_pow((v - d).abs_(), o.p), c) * _pow(s, o.p)
                better = e < best
                if not o.clip:
                    better &= _admissible(s, z, lo, hi, o.qmax)
                best = torch.where(better, e, best)
                bs = torch.where(better, s, bs)
                bz = torch.where(better, z, bz)
    return bs, bz, best


def _hq_integer(
    w: Tensor, c: Tensor | None, o: _Opt, s: Tensor, z: Tensor, lo: Tensor, hi: Tensor
) -> tuple[Tensor, Tensor]:
    """The half-quadratic loop over the scale with fixed integer zeros: codes, ``W_e``, then
    the closed form ``s = <q - z, w - W_e> / |q - z|^2`` (without clipping: at least
    ``s_min(z)``). Rows leave at their first iteration that does not improve. Returns the best
    (scale, objective) per row."""
    best_s = s.clone()
    best = torch.full_like(s, torch.inf)
    idx = torch.arange(w.shape[0])
    floor = None if o.clip else smallest_scale(z, lo, hi, o.bits)
    beta = o.beta
    for it in range(o.iters + 1):
        d = torch.clamp(torch.round(w / s) + z, 0, o.qmax) - z
        r = w - s * d
        rp = _pow(r.abs(), o.p)
        obj = _wsum(rp, c)
        better = obj < best[idx]
        if floor is not None:
            better &= _admissible(s, z, lo, hi, o.qmax)
        better = better.squeeze(1)
        bi = idx[better]
        best[bi], best_s[bi] = obj[better], s[better]
        if it == o.iters or not better.any():
            break
        if it > 0 and not better.all():  # per-row early stop: keep the improving rows
            idx, w, d, r, rp, s, z, lo, hi = (x[better] for x in (idx, w, d, r, rp, s, z, lo, hi))
            c = None if c is None else c[better]
            floor = None if floor is None else floor[better]
        t = w - _shrink_from(r, rp, beta) if o.p <= 1 else w
        den = _wsum(d * d, c)
        s_new = _wsum(d * t, c) / den.clamp(min=_TINY)
        s = torch.where((den > 0) & (s_new > 0), s_new, s)
        if floor is not None:
            s = torch.maximum(s, floor)
        beta *= o.kappa
    return best_s, best


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
    clip: bool = False,
    scan: tuple[float, float, int] | None = (1.0, 1.15, 8),
    opt_scale: bool = True,
) -> HQQFit:
    """HQQ parameters for every row of ``w`` (rows, n), with the objective they reach.

    ``clip=False`` admits only parameters that keep every weight within half a step of the
    grid. ``scan = (low, high, steps)``: the start is the best of ``steps`` scales from
    ``low`` to ``high`` times ``s_min(z)`` for three zeros (``clip=True``: times the min-max
    scale, with centring zeros); None starts at min-max. ``opt_scale``: run the
    half-quadratic loop on the scale.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"integer grids take 2..8 bits, not {bits}")
    if w.dim() != 2:
        raise ValueError(f"w must be (rows, n), not {tuple(w.shape)}")
    w = w.float()
    c = None if weight is None else weight.float().clamp(min=0).expand_as(w).contiguous()
    qmax = (1 << bits) - 1
    o = _Opt(bits, qmax, lp_norm, iters, beta, kappa, clip)
    lo = w.min(1, keepdim=True).values
    hi = w.max(1, keepdim=True).values
    s0, z0 = qparams_from_range(lo, hi, bits, symmetric, scale_dtype)
    start = lp_error(w, s0, z0, bits, lp_norm, c)

    s, z = s0, z0
    if scan is not None:
        factors = torch.linspace(scan[0], scan[1], int(scan[2])).tolist()
        if clip:
            refs = [(s0, z0 if symmetric else None)]
        elif symmetric:
            refs = [(smallest_scale(z0, lo, hi, bits).clamp(min=_TINY), z0)]
        else:
            zs = torch.arange(qmax + 1, dtype=w.dtype)
            zb = smallest_scale(zs, lo, hi, bits).argmin(1, keepdim=True).to(w.dtype)
            refs = []
            for dz in (-1, 0, 1):
                zc = (zb + dz).clamp(0, qmax)
                refs.append((smallest_scale(zc, lo, hi, bits).clamp(min=_TINY), zc))
        s, z, _ = _scan(w, c, o, refs, factors, lo, hi)
    if opt_scale:
        s = _hq_integer(w, c, o, s, z, lo, hi)[0]

    # store the scale: the fp16 neighbour (below or above) with the lower objective; rounding
    # up keeps a scale admissible, rounding down may not
    if scale_dtype == "float16":
        down, up = _fp16_neighbours(s)
        e_down = lp_error(w, down, z, bits, lp_norm, c)
        e_up = lp_error(w, up, z, bits, lp_norm, c)
        if not clip:
            e_down = torch.where(_admissible(down, z, lo, hi, qmax), e_down, torch.inf)
        s = torch.where(e_up <= e_down, up, down)
        err = torch.minimum(e_down, e_up)
    else:
        s = s.clamp(min=_TINY)
        err = lp_error(w, s, z, bits, lp_norm, c)
    keep = start <= err  # never worse than the min-max start
    if not clip:
        keep |= ~_admissible(s, z, lo, hi, qmax)
    return HQQFit(
        torch.where(keep, s0, s), torch.where(keep, z0, z), torch.where(keep, start, err), start
    )


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
    **options,
) -> tuple[Tensor, Tensor]:
    """(scale, zero) of shape (rows, 1) for :func:`lowbit.formats.integer.quantize`: HQQ with
    integer zero points. ``options`` and the objective reached: :func:`hqq_fit`."""
    f = hqq_fit(w, bits, symmetric, scale_dtype, weight, iters, lp_norm, beta, kappa, **options)
    return f.scale, f.zero
