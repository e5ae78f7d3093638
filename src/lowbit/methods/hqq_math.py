"""HQQ (Badri & Shaji, 2023): half-quadratic fitting of integer affine weight parameters.

Pure tensor math, no model knowledge, no calibration data. Each row of ``w`` (rows, n) gets
one ``(scale, zero)`` in lowbit's integer convention (``lowbit.formats.integer``): codes
``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, ``w_hat = scale * (q - zero)``, scales
holding fp16 values, zero points integers in ``[0, 2^b - 1]`` (fixed at ``2^(b-1)`` when
symmetric).

The objective is HQQ's robust ``sum_j c_j |w_j - w_hat_j|^p`` (``p = lp_norm``, ``c`` an
optional non-negative weight). Half-quadratic splitting introduces ``W_e ~ w - w_hat`` and
alternates, vectorised over all rows:

1. codes ``q`` by rounding (the exact minimiser for fixed parameters);
2. ``W_e = shrink_p(w - w_hat, beta)``, the proximal step of ``|.|^p`` (a generalised soft
   threshold: large residuals pass into ``W_e`` and stop pulling the fit, small ones vanish);
3. the closed-form least-squares parameters given ``q`` and the target ``w - W_e``;

``beta`` grows by ``kappa`` every iteration, and a row stops (HQQ's early stop, per row) at
its first iteration that does not lower its objective; it keeps its best parameters.

HQQ's own zero point is a float. Ours is an integer, and an integer zero only chooses which
``2^b`` levels of the lattice ``scale * Z`` are used: the grid always contains 0, and the scale
is the only continuous freedom left. The objective is then far from convex in the scale (each
code boundary crossing 0 is a kink), so HQQ's local alternation started at min-max stalls. The
default therefore (``init="scan"``) starts from the best of a short scan of scales (each with
the centring integer zero and its two neighbours), then runs the half-quadratic loop on the
scale with that zero fixed (``zero_mode="fixed"``), stores the fp16 neighbour of the scale
with the lower objective, and never returns anything worse than the min-max start. The other
``zero_mode`` values are HQQ with a float zero followed by a way back to an integer; they
were measured (``benchmarks/hqq_probe.py``) and lose.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lowbit.formats.integer import dequantize, qparams_from_range, quantize

ZeroMode = Literal["fixed", "joint", "round", "refit", "search"]
_TINY = 1e-30


class HQQFit(NamedTuple):
    """Result of :func:`hqq_fit`; every tensor has shape (rows, 1), float32."""

    scale: Tensor  # fp16-representable values (when scale_dtype is float16)
    zero: Tensor  # integers in [0, 2^b - 1]
    error: Tensor  # sum_j c_j |w_j - w_hat_j|^p with the returned (stored) parameters
    start_error: Tensor  # the same objective for the min-max start


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """HQQ's generalised soft threshold for ``|e|^p`` with coupling ``beta``:
    ``sign(x) * max(|x| - |x|^(p-1) / beta, 0)`` (``p = 1``: the ordinary soft threshold)."""
    ax = x.abs()
    if p == 1:
        return torch.sign(x) * torch.relu(ax - 1.0 / beta)
    return _shrink_from(x, ax.pow(p), beta)


def _shrink_from(r: Tensor, rp: Tensor, beta: float) -> Tensor:
    # r * max(1 - |r|^(p-2) / beta, 0), given rp = |r|^p: no division by zero at r == 0
    return r * torch.relu(1.0 - rp / (beta * r * r + _TINY))


def lp_error(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, p: float, weight: Tensor | None = None
) -> Tensor:
    """Per-row ``sum c |w - dequantize(quantize(w))|^p`` (rows, 1), through lowbit's own
    ``quantize`` / ``dequantize`` (so it is exactly the error of the stored parameters)."""
    r = w - dequantize(quantize(w, scale, zero, bits), scale, zero)
    return _wsum(_pow(r.abs(), p), weight)


def _pow(a: Tensor, p: float) -> Tensor:
    return a * a if p == 2 else (a if p == 1 else a.pow(p))


def _wsum(x: Tensor, c: Tensor | None) -> Tensor:
    return (x if c is None else x * c).sum(1, keepdim=True)


def _fp16_neighbours(s: Tensor) -> tuple[Tensor, Tensor]:
    """The fp16 values just below and just above (or equal to) each positive ``s``."""
    s = s.clamp(min=2.0**-24, max=65504.0)
    near = s.to(torch.float16)
    inf = torch.full_like(near, torch.inf)
    up = torch.where(near.float() < s, torch.nextafter(near, inf), near)
    down = torch.where(near.float() > s, torch.nextafter(near, torch.zeros_like(near)), near)
    return down.float(), up.float()


class _Opt(NamedTuple):
    qmax: int
    p: float
    iters: int
    beta: float
    kappa: float


def _scan(
    w: Tensor, c: Tensor | None, o: _Opt, s_ref: Tensor, lo: Tensor, hi: Tensor,
    z_fixed: Tensor | None, factors: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Best (scale, zero, objective) over ``scale = s_ref * f`` for f in ``factors``, each with
    the two integer zeros nearest to centring the grid on ``[lo, hi]`` (or with ``z_fixed``).
    Errors are computed in scale steps: ``w - s (q - z) = s (v - clamp(round(v), -z, qmax - z))``
    with ``v = w / s``."""
    best = torch.full_like(s_ref, torch.inf)
    bs, bz = s_ref, s_ref
    u = w / s_ref
    for f in factors.tolist():
        s = s_ref * f
        v = u / f
        x = torch.round(v)
        if z_fixed is None:
            zc = torch.floor(o.qmax / 2 - (lo + hi) / (2 * s))
            zs = [zc.clamp(0, o.qmax), (zc + 1).clamp(0, o.qmax)]
        else:
            zs = [z_fixed]
        for z in zs:
            d = torch.clamp(x, -z, o.qmax - z)
            e = _wsum(_pow((v - d).abs(), o.p), c) * _pow(s, o.p)
            better = e < best
            best = torch.where(better, e, best)
            bs = torch.where(better, s, bs)
            bz = torch.where(better, z, bz)
    return bs, bz, best


def _hq_integer(
    w: Tensor, c: Tensor | None, o: _Opt, s: Tensor, z: Tensor, joint: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The half-quadratic loop with integer zeros: the scale's closed form given the codes and
    ``w - W_e`` (``joint``: the zero too, by least squares then rounding, the scale refitted).
    Rows leave the loop at their first non-improving iteration. Returns the best
    (scale, zero, objective) per row."""
    best_s, best_z = s.clone(), z.clone()
    best = torch.full_like(s, torch.inf)
    idx = torch.arange(w.shape[0])
    beta = o.beta
    for it in range(o.iters + 1):
        q = torch.clamp(torch.round(w / s) + z, 0, o.qmax)
        d = q - z
        r = w - s * d
        rp = _pow(r.abs(), o.p)
        obj = _wsum(rp, c)
        better = (obj < best[idx]).squeeze(1)
        bi = idx[better]
        best[bi], best_s[bi], best_z[bi] = obj[better], s[better], z[better]
        if it == o.iters or not better.any():
            break
        if it > 0 and not better.all():  # per-row early stop: keep the improving rows
            idx, w, q, d, r, rp, s, z = (t[better] for t in (idx, w, q, d, r, rp, s, z))
            c = None if c is None else c[better]
        t = w - _shrink_from(r, rp, beta)
        if joint:
            tot = _wsum(torch.ones_like(t), c)
            mq, mt = _wsum(q, c) / tot, _wsum(t, c) / tot
            dq = q - mq
            a = _wsum(dq * (t - mt), c) / _wsum(dq * dq, c).clamp(min=_TINY)
            z_new = torch.round(mq - mt / a).clamp(0, o.qmax)
            z = torch.where(a > 0, z_new, z)
            d = q - z
        den = _wsum(d * d, c)
        s_new = _wsum(d * t, c) / den.clamp(min=_TINY)
        s = torch.where((den > 0) & (s_new > 0), s_new, s)
        beta *= o.kappa
    return best_s, best_z, best


def _hq_float(
    w: Tensor, c: Tensor | None, o: _Opt, s: Tensor, z: Tensor, opt_scale: bool
) -> tuple[Tensor, Tensor]:
    """HQQ as published: a float zero (and, ``opt_scale``, the scale) by least squares on
    ``w - W_e``; the best (scale, zero) per row by the objective with that float zero."""
    best_s, best_z = s, z
    best = torch.full_like(s, torch.inf)
    beta = o.beta
    for _ in range(o.iters):
        q = torch.clamp(torch.round(w / s + z), 0, o.qmax)
        r = w - s * (q - z)
        rp = _pow(r.abs(), o.p)
        obj = _wsum(rp, c)
        better = obj < best
        if not better.any():
            break
        best = torch.where(better, obj, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        t = w - _shrink_from(r, rp, beta)
        tot = _wsum(torch.ones_like(t), c)
        mq, mt = _wsum(q, c) / tot, _wsum(t, c) / tot
        if opt_scale:
            dq = q - mq
            den = _wsum(dq * dq, c)
            a = _wsum(dq * (t - mt), c) / den.clamp(min=_TINY)
            s = torch.where((den > 0) & (a > 0), a, s)
        z = mq - mt / s  # w - W_e ~ s (q - z)
        beta *= o.kappa
    return best_s, best_z


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
    init: Literal["scan", "minmax"] = "scan",
    scan: tuple[float, float, int] = (0.6, 1.05, 10),
    zero_mode: ZeroMode = "fixed",
    opt_scale: bool = True,
) -> HQQFit:
    """HQQ parameters for every row of ``w`` (rows, n), with the objective they reach.

    ``init="scan"`` starts from the best of ``scan = (low, high, steps)`` multiples of the
    min-max scale; ``zero_mode`` is how the zero becomes an integer: ``fixed`` (the start's,
    the scale optimised), ``joint`` (re-chosen every iteration), or HQQ with a float zero
    (``opt_scale``: and a free scale) then ``round`` it, round and ``refit`` the scale, or
    ``search`` its two integer neighbours, each with its scale refitted.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"integer grids take 2..8 bits, not {bits}")
    if w.dim() != 2:
        raise ValueError(f"w must be (rows, n), not {tuple(w.shape)}")
    w = w.float()
    c = None if weight is None else weight.float().clamp(min=0).expand_as(w).contiguous()
    qmax = (1 << bits) - 1
    o = _Opt(qmax, lp_norm, iters, beta, kappa)
    lo = w.min(1, keepdim=True).values
    hi = w.max(1, keepdim=True).values
    s0, z0 = qparams_from_range(lo, hi, bits, symmetric, scale_dtype)
    start = lp_error(w, s0, z0, bits, lp_norm, c)

    s, z = s0, z0
    if init == "scan":
        factors = torch.linspace(scan[0], scan[1], int(scan[2]))
        s, z, _ = _scan(w, c, o, s0, lo, hi, z0 if symmetric else None, factors)
    elif init != "minmax":
        raise ValueError(f"init must be scan or minmax, not {init!r}")
    if symmetric or zero_mode in ("fixed", "joint"):
        if opt_scale:
            s, z, _ = _hq_integer(w, c, o, s, z, joint=zero_mode == "joint" and not symmetric)
    elif zero_mode in ("round", "refit", "search"):
        sf, zf = _hq_float(w, c, o, s, z, opt_scale)
        if zero_mode == "round":
            s, z = sf, torch.round(zf).clamp(0, qmax)
        elif zero_mode == "refit":
            s, z, _ = _hq_integer(w, c, o, sf, torch.round(zf).clamp(0, qmax), joint=False)
        else:
            k = w.shape[0]
            z_lo = torch.floor(zf).clamp(0, qmax)
            z2 = torch.cat([z_lo, (z_lo + 1).clamp(max=qmax)])
            c2 = None if c is None else c.repeat(2, 1)
            s2, z2, e2 = _hq_integer(w.repeat(2, 1), c2, o, sf.repeat(2, 1), z2, joint=False)
            up = e2[k:] < e2[:k]
            s, z = torch.where(up, s2[k:], s2[:k]), torch.where(up, z2[k:], z2[:k])
    else:
        raise ValueError(f"unknown zero_mode {zero_mode!r}")

    # store the scale: the fp16 neighbour (below or above) with the lower objective
    if scale_dtype == "float16":
        down, up = _fp16_neighbours(s)
        e_down, e_up = lp_error(w, down, z, bits, lp_norm, c), lp_error(w, up, z, bits, lp_norm, c)
        s = torch.where(e_up <= e_down, up, down)
        err = torch.minimum(e_down, e_up)
    else:
        s = s.clamp(min=_TINY)
        err = lp_error(w, s, z, bits, lp_norm, c)
    keep = start <= err  # never worse than the min-max start
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
