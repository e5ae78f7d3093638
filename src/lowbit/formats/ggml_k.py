"""ggml k-quants (Q2_K..Q6_K) and IQ4_NL / IQ4_XS, plus the scale searches shared with the legacy
types in `lowbit.formats.ggml`.

Everything is numpy, vectorised over blocks (Python loops only run over search candidates or
positions inside a block). Byte layouts are ggml's; the searches follow llama.cpp's
`make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`, `make_qkx3_quants` and `make_qp_quants`
in float32 with C's operation and summation order, so the bytes equal llama.cpp's (a C build
that fuses multiply-adds can still differ on rare near-ties). Encoders take `x` of shape
(n_blocks, block_size) float32 and optional error weights `qw` of the same shape; they return
(n_blocks, type_size) uint8. Decoders do the reverse.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
F32 = np.float32
_EPS = F32(1e-15)  # llama.cpp GROUP_MAX_EPS: a group whose max |x| is below this is all zero

IQ4_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)
_IQ4_MIDS2 = IQ4_VALUES[:-1] + IQ4_VALUES[1:]  # level i is chosen once 2x >= val[i-1] + val[i]


# ----------------------------------------------------------------------------- small helpers


def f16(a: np.ndarray) -> np.ndarray:
    """Round to float16 (ties to even, as ggml) and return as float32."""
    return np.asarray(a, dtype=F32).astype(np.float16).astype(F32)


def f16_bytes(a: np.ndarray) -> np.ndarray:
    """float32 array (n,) -> little-endian float16 bytes (n, 2)."""
    return np.asarray(a, dtype=F32).astype("<f2").view(np.uint8).reshape(-1, 2)


def f16_from(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 2) little-endian float16 -> float32 (n, 1)."""
    return np.ascontiguousarray(b).view("<f2").astype(F32).reshape(-1, 1)


def nearest(v: np.ndarray) -> np.ndarray:
    """ggml nearest_int: round half to even; NaN/inf (guarded cases) map to 0."""
    r = np.rint(v)
    return np.where(np.isfinite(r), r, F32(0)).astype(F32)


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in sequential float32 order, as ggml's C loops accumulate."""
    return np.cumsum(a, axis=-1, dtype=F32)[..., -1]


def safe_div(a: np.ndarray, b: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """a / b where ok, else 0 (no warnings)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, a / np.where(ok, b, F32(1)), F32(0)).astype(F32)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """Value with the largest |x| along the last axis (first one on ties), keepdims."""
    return np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)


def fallback_weights(w: np.ndarray, alt: np.ndarray) -> np.ndarray:
    """Use `alt` weights for groups whose weights sum to zero (no information there)."""
    return np.where((w.sum(-1, keepdims=True) > 0), w, alt)


def pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0xF) | ((hi.astype(np.uint8) & 0xF) << 4)


def iq4_index(v: np.ndarray) -> np.ndarray:
    """Index of the nearest IQ4_NL level to v (ggml best_index_int8)."""
    return np.searchsorted(_IQ4_MIDS2, 2 * v, side="right").astype(np.intp)


# ----------------------------------------------------------------------------- scale searches


def make_qx(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes in [0, 2*nmax) and scale maximising (sum w x l)^2 / sum w l^2 over 19
    candidate inverse scales -(nmax + 0.1 i)/max (llama.cpp make_qx_quants, rmse_type 1)."""
    mx = signed_absmax(x)
    zero = np.abs(mx) < _EPS
    mx = np.where(zero, F32(1), mx)

    def trial(num: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(nearest((-num / mx) * x), -nmax, nmax - 1)
        return lv, seq_sum(w * x * lv), seq_sum(w * lv * lv)

    L, slx, sl2 = trial(F32(nmax))
    scale = safe_div(slx, sl2, sl2 != 0)
    best = scale * slx
    for i in range(-9, 10):
        if i == 0:
            continue
        lv, slx, sl2 = trial(F32(nmax) + F32(0.1) * F32(i))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better[..., None], lv, L)
        scale = np.where(better, safe_div(slx, sl2, better), scale)
        best = np.where(better, scale * slx, best)
    L = np.where(zero, F32(0), L + nmax)
    return np.where(zero[..., 0], F32(0), scale), L


def make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K reference sub-block search: round at -nmax/max, then coordinate descent on each
    code with weights x^2 (llama.cpp make_q3_quants with do_rmse)."""
    mx = signed_absmax(x)
    zero = (np.abs(mx) < _EPS)[..., 0]
    mx = np.where(zero[..., None], F32(1), mx)
    L = np.clip(nearest((-F32(nmax) / mx) * x), -nmax, nmax - 1)
    w = x * x
    sumlx = seq_sum(w * x * L)
    suml2 = seq_sum(w * L * L)
    for _ in range(5):
        changed = np.zeros(zero.shape, dtype=bool)
        for i in range(x.shape[-1]):
            xi, wi, li = x[..., i], w[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            ok = slx > 0
            sl2 = suml2 - wi * li * li
            nl = np.clip(nearest(safe_div(xi * sl2, slx, ok)), -nmax, nmax - 1)
            slx2 = slx + wi * xi * nl
            sl22 = sl2 + wi * nl * nl
            acc = ok & (nl != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[..., i] = np.where(acc, nl, li)
            sumlx = np.where(acc, slx2, sumlx)
            suml2 = np.where(acc, sl22, suml2)
            changed |= acc
        if not changed.any():
            break
    scale = safe_div(sumlx, suml2, (suml2 > 0) & ~zero)
    return scale, np.where(zero[..., None], F32(0), L + nmax)


def make_qkx(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    v3: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine codes in [0, nmax] with scale and min (x ~ scale*L - the_min) from a search over
    nstep+1 inverse scales, each followed by a weighted least-squares fit of scale and min
    (llama.cpp make_qkx2_quants, or make_qkx3_quants when v3). Returns (scale, the_min, L)."""
    mn = np.minimum(x.min(-1), F32(0))
    mx = x.max(-1)
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    flat = mx == mn
    rng = np.where(flat, F32(1), mx - mn)

    def err(d: np.ndarray) -> np.ndarray:
        return seq_sum(w * (np.abs(d) if use_mad else d * d))

    iscale = F32(nmax) / rng
    scale = safe_div(F32(1), iscale, ~flat)
    L = np.clip(nearest(iscale[..., None] * (x - mn[..., None])), 0, nmax)
    best = err(scale[..., None] * L + mn[..., None] - x)
    for i in range(nstep + 1):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            isc = (F32(rmin) + F32(rdelta) * F32(i) + F32(nmax)) / (mx - mn)
            v = isc[..., None] * (x - mn[..., None])
        if v3:
            lv = np.where(v > 0, nearest(np.minimum(v, F32(nmax))), F32(0))
        else:
            lv = np.clip(nearest(v), 0, nmax)
        wl = w * lv
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(wl * lv)
        sum_xl = seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = (D > 0) & ~flat
        t_scale = safe_div(sum_w * sum_xl - sum_x * sum_l, D, ok)
        t_min = safe_div(sum_l2 * sum_x - sum_l * sum_xl, D, ok)
        pos = t_min > 0
        t_min = np.where(pos, F32(0), t_min)
        t_scale = np.where(pos, safe_div(sum_xl, sum_l2, pos & (sum_l2 != 0)), t_scale)
        cur = err(t_scale[..., None] * lv + t_min[..., None] - x)
        better = ok & (cur < best)
        L = np.where(better[..., None], lv, L)
        best = np.where(better, cur, best)
        scale = np.where(better, t_scale, scale)
        mn = np.where(better, t_min, mn)
    L = np.where(flat[..., None], F32(0), L)
    return np.where(flat, F32(0), scale), -mn, L


def make_qp(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes in [0, nmax] for non-negative x (block scales or mins) and their super-scale:
    9 candidate inverse scales, then coordinate descent (llama.cpp make_qp_quants)."""
    mx = np.maximum(x.max(-1), F32(0))
    zero = mx < _EPS
    mx = np.where(zero, F32(1), mx)[..., None]
    best_is = F32(nmax) / mx
    sc = F32(1) / best_is
    diff = x - sc * nearest(best_is * x)
    best = seq_sum(w * diff * diff)
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = (F32(0.1) * F32(i) + F32(nmax)) / mx
        sc = F32(1) / isc
        diff = x - sc * np.minimum(F32(nmax), nearest(isc * x))
        mse = seq_sum(w * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        best_is = np.where(better[..., None], isc, best_is)
    L = np.clip(nearest(best_is * x), 0, nmax)
    sumlx = seq_sum(w * x * L)
    suml2 = seq_sum(w * L * L)
    for _ in range(5):
        changed = np.zeros(zero.shape, dtype=bool)
        for i in range(x.shape[-1]):
            xi, wi, li = x[..., i], w[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            nl = np.clip(nearest(safe_div(xi * sl2, slx, ok)), 0, nmax)
            slx2 = slx + wi * xi * nl
            sl22 = sl2 + wi * nl * nl
            acc = ok & (nl != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[..., i] = np.where(acc, nl, li)
            sumlx = np.where(acc, slx2, sumlx)
            suml2 = np.where(acc, sl22, suml2)
            changed |= acc
        if not changed.any():
            break
    scale = safe_div(sumlx, suml2, (suml2 > 0) & ~zero)
    return scale, np.where(zero[..., None], F32(0), L)


# ----------------------------------------------------------------------------- packing pieces


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(nb, 256) codes 0..3 -> (nb, 64): byte 32c+l holds L[128c + 32k + l] at bits 2k."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[:, None]
    return np.bitwise_or.reduce(q, axis=2).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
    return (q & 3).reshape(-1, QK_K)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> 12 bytes (ggml get_scale_min_k4 layout)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    a = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    c = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return np.concatenate([a, b, c], axis=1)


def _unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0xF) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc.astype(F32), mn.astype(F32)


def _superblock_sigma2(x: np.ndarray, factor: float) -> np.ndarray:
    return (F32(factor) * seq_sum(x * x) / F32(x.shape[-1]))[:, None, None]


# ----------------------------------------------------------------------------- Q2_K


def quantize_q2_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    if qw is None:
        sc, mins, L = make_qkx(xs, np.abs(xs), 3, -0.5, 0.1, 15, True, False)
        max_sc = np.maximum(sc.max(-1), F32(0))[:, None]
        max_mn = np.maximum(mins.max(-1), F32(0))[:, None]
        ls = np.clip(nearest(safe_div(F32(15), max_sc, max_sc > 0) * sc), 0, 15)
        lm = np.clip(nearest(safe_div(F32(15), max_mn, max_mn > 0) * mins), 0, 15)
        d, dmin = f16(max_sc / F32(15)), f16(max_mn / F32(15))
    else:
        w = qw.reshape(nb, 16, 16) * np.sqrt(_superblock_sigma2(x, 1.0) + xs * xs)
        w = fallback_weights(w, xs * xs)
        sc, mins, L = make_qkx(xs, w, 3, -0.9, 0.05, 36, False, True)
        sw = seq_sum(w)
        dm, ls = make_qp(sc, 15, sw)
        mm, lm = make_qp(mins, 15, sw)
        d, dmin = f16(dm[:, None]), f16(mm[:, None])
    dl = d * ls
    ml = dmin * lm
    ok = (dl != 0)[..., None]
    Lq = np.clip(nearest(safe_div(xs + ml[..., None], dl[..., None], ok)), 0, 3)
    L = np.where(ok, Lq, L).reshape(nb, QK_K)
    scales = ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)
    return np.concatenate([scales, _pack_2bit(L), f16_bytes(d[:, 0]), f16_bytes(dmin[:, 0])], 1)


def dequantize_q2_k(b: np.ndarray) -> np.ndarray:
    sc, qs = b[:, :16], b[:, 16:80]
    d, dmin = f16_from(b[:, 80:82]), f16_from(b[:, 82:84])
    dl = (d * (sc & 0xF).astype(F32))[..., None]
    ml = (dmin * (sc >> 4).astype(F32))[..., None]
    q = _unpack_2bit(qs).reshape(-1, 16, 16).astype(F32)
    return (dl * q - ml).reshape(-1, QK_K)


# ----------------------------------------------------------------------------- Q3_K


def quantize_q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    if qw is None:
        sc, L = make_q3(xs, 4)
        max_sc = signed_absmax(sc)
        nz = max_sc != 0
        iscale = safe_div(F32(-32), max_sc, nz)
        ls = np.where(nz, np.clip(nearest(iscale * sc), -32, 31) + 32, F32(0))
        d = f16(safe_div(F32(1), iscale, nz))
    else:
        w = qw.reshape(nb, 16, 16) * np.sqrt(_superblock_sigma2(x, 2.0) + xs * xs)
        w = fallback_weights(w, xs * xs)
        sc, L = make_qx(xs, 4, w)
        d_block, ls = make_qx(sc, 32, seq_sum(w))
        d = f16(d_block[:, None])
    dl = (d * (ls - 32))[..., None]
    ok = dl != 0
    L = np.where(ok, np.clip(nearest(safe_div(xs, dl, ok)), -4, 3) + 4, L).reshape(nb, 8, 32)
    hi = L > 3
    hmask = np.bitwise_or.reduce(
        hi.astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None], axis=1
    )
    L = np.where(hi, L - 4, L).reshape(nb, QK_K)
    ls = ls.astype(np.uint8)
    low = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    high = np.bitwise_or.reduce(
        ((ls >> 4) & 3).reshape(nb, 4, 4) << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=1
    )
    return np.concatenate([hmask, _pack_2bit(L), low, high, f16_bytes(d[:, 0])], 1)


def dequantize_q3_k(b: np.ndarray) -> np.ndarray:
    hmask, qs, s = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = f16_from(b[:, 108:110])
    low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
    high = (s[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    ls = low | (high.reshape(-1, 16) << 4)
    dl = (d * (ls.astype(np.int8) - np.int8(32)).astype(F32))[..., None]
    hb = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = _unpack_2bit(qs).astype(np.int8) - ((hb.reshape(-1, QK_K) ^ 1) << 2).astype(np.int8)
    return (dl * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)


# ----------------------------------------------------------------------------- Q4_K / Q5_K


def _quantize_q45_k(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, ...]:
    nb = x.shape[0]
    xs = x.reshape(nb, 8, 32)
    if qw is None:
        av_x = np.sqrt(seq_sum(xs * xs)[..., None] / F32(32))
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        sc, mins, L = make_qkx(xs, av_x + np.abs(xs), nmax, rmin, 0.1, nstep, False, False)
        max_sc = np.maximum(sc.max(-1), F32(0))[:, None]
        max_mn = np.maximum(mins.max(-1), F32(0))[:, None]
        ls = np.clip(nearest(safe_div(F32(63), max_sc, max_sc > 0) * sc), 0, 63)
        lm = np.clip(nearest(safe_div(F32(63), max_mn, max_mn > 0) * mins), 0, 63)
        d, dmin = f16(max_sc / F32(63)), f16(max_mn / F32(63))
    else:
        w = qw.reshape(nb, 8, 32) * np.sqrt(_superblock_sigma2(x, 2.0) + xs * xs)
        w = fallback_weights(w, xs * xs)
        sc, mins, L = make_qkx(xs, w, nmax, -0.9, 0.05, 36, False, True)
        sw = seq_sum(w)
        d_block, ls = make_qp(sc, 63, sw)
        m_block, lm = make_qp(mins, 63, sw)
        d, dmin = f16(d_block[:, None]), f16(m_block[:, None])
    dl = (d * ls)[..., None]
    ok = dl != 0
    Lq = np.clip(nearest(safe_div(xs + (dmin * lm)[..., None], dl, ok)), 0, nmax)
    L = np.where(ok, Lq, L).astype(np.uint8)
    head = [f16_bytes(d[:, 0]), f16_bytes(dmin[:, 0]), _pack_k4_scales(ls, lm)]
    return head, L


def quantize_q4_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    head, L = _quantize_q45_k(x, qw, 15)
    L = L.reshape(-1, 4, 2, 32)
    qs = pack_nibbles(L[:, :, 0], L[:, :, 1]).reshape(-1, 128)
    return np.concatenate([*head, qs], axis=1)


def quantize_q5_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    head, L = _quantize_q45_k(x, qw, 31)
    hb = (L >> 4) << np.arange(8, dtype=np.uint8)[:, None]
    qh = np.bitwise_or.reduce(hb, axis=1)
    L = L.reshape(-1, 4, 2, 32)
    qs = pack_nibbles(L[:, :, 0], L[:, :, 1]).reshape(-1, 128)
    return np.concatenate([*head, qh, qs], axis=1)


def _k4_affine(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, dmin = f16_from(b[:, 0:2]), f16_from(b[:, 2:4])
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    return (d * sc)[..., None], (dmin * mn)[..., None]


def _unpack_nibbles_k(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8)[:, None]
    return (q & 0xF).reshape(-1, 8, 32)


def dequantize_q4_k(b: np.ndarray) -> np.ndarray:
    dl, ml = _k4_affine(b)
    q = _unpack_nibbles_k(b[:, 16:144]).astype(F32)
    return (dl * q - ml).reshape(-1, QK_K)


def dequantize_q5_k(b: np.ndarray) -> np.ndarray:
    dl, ml = _k4_affine(b)
    hb = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = (_unpack_nibbles_k(b[:, 48:176]) | (hb << 4)).astype(F32)
    return (dl * q - ml).reshape(-1, QK_K)


# ----------------------------------------------------------------------------- Q6_K


def quantize_q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    w = xs * xs if qw is None else fallback_weights(qw.reshape(nb, 16, 16), xs * xs)
    sc, L = make_qx(xs, 32, w)
    max_sc = signed_absmax(sc)
    zero = np.abs(max_sc) < _EPS
    iscale = safe_div(F32(-128), max_sc, ~zero)
    d = f16(safe_div(F32(1), iscale, ~zero))
    ls = np.where(zero, F32(0), np.minimum(F32(127), nearest(iscale * sc)))
    dl = (d * ls)[..., None]
    ok = dl != 0
    L = np.where(ok, np.clip(nearest(safe_div(xs, dl, ok)), -32, 31) + 32, L)
    L = np.where(zero[..., None], F32(0), L).astype(np.uint8).reshape(nb, 2, 4, 32)
    ql = np.concatenate(
        [pack_nibbles(L[:, :, 0], L[:, :, 2]), pack_nibbles(L[:, :, 1], L[:, :, 3])], axis=2
    ).reshape(nb, 128)
    qh = np.bitwise_or.reduce(
        (L >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=2
    ).reshape(nb, 64)
    scales = ls.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales, f16_bytes(d[:, 0])], axis=1)


def dequantize_q6_k(b: np.ndarray) -> np.ndarray:
    ql = b[:, :128].reshape(-1, 2, 2, 1, 32) >> np.array([0, 4], dtype=np.uint8)[:, None]
    ql = (ql & 0xF).transpose(0, 1, 3, 2, 4).reshape(-1, 2, 4, 32)  # (chunk, k, l)
    qh = b[:, None, 128:192].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
    q = (ql | ((qh & 3) << 4)).astype(np.int8) - np.int8(32)
    sc = b[:, 192:208].view(np.int8).astype(F32)
    dl = (f16_from(b[:, 208:210]) * sc)[..., None]
    return (dl * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)


# ----------------------------------------------------------------------------- IQ4_NL / IQ4_XS


def _iq4_block_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per 32-group scale for the IQ4 code book: 16 candidates (llama.cpp ntry = 7)."""
    mx = signed_absmax(x)
    zero = (np.abs(mx) < _EPS)[..., 0]
    mx = np.where(zero[..., None], F32(1), mx)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = IQ4_VALUES[iq4_index(iscale * x)]
        wq = w * q
        return seq_sum(wq * x), seq_sum(wq * q)

    sqx, sq2 = trial(F32(1) / (mx / F32(127)))
    d = safe_div(sqx, sq2, sq2 > 0)
    best = d * sqx
    for i in range(-7, 8):
        sqx, sq2 = trial(F32(i - 127) / mx)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(better, safe_div(sqx, sq2, better), d)
        best = np.where(better, d * sqx, best)
    return np.where(zero, F32(0), d)


def _iq4_weights(x: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray) -> np.ndarray:
    if qw is None:
        return x * x
    return fallback_weights(qw * np.sqrt(sigma2 + x * x), x * x)


def quantize_iq4_nl(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    sigma2 = (F32(2) * seq_sum(x * x) / F32(32))[:, None]
    qw = None if qw is None else qw.reshape(x.shape)
    d = _iq4_block_scales(x, _iq4_weights(x, qw, sigma2))[:, None]
    L = iq4_index(safe_div(F32(1), d, d != 0) * x)
    return np.concatenate([f16_bytes(d[:, 0]), pack_nibbles(L[:, :16], L[:, 16:])], axis=1)


def dequantize_iq4_nl(b: np.ndarray) -> np.ndarray:
    q = np.concatenate([b[:, 2:18] & 0xF, b[:, 2:18] >> 4], axis=1)
    return f16_from(b[:, :2]) * IQ4_VALUES[q]


def quantize_iq4_xs(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 8, 32)
    qw = None if qw is None else qw.reshape(nb, 8, 32)
    sc = _iq4_block_scales(xs, _iq4_weights(xs, qw, _superblock_sigma2(x, 2.0)))
    dsb = -signed_absmax(sc) / F32(32)
    lsc = np.clip(nearest(safe_div(F32(1), dsb, dsb != 0) * sc), -32, 31)
    dl = (dsb * lsc)[..., None]
    L = iq4_index(safe_div(F32(1), dl, dl != 0) * xs)
    ls = (lsc + 32).astype(np.uint16)
    sl = (ls & 0xF).astype(np.uint8).reshape(nb, 4, 2)
    sh = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
    qs = pack_nibbles(L[:, :, :16], L[:, :, 16:]).reshape(nb, 128)
    return np.concatenate(
        [
            f16_bytes(dsb[:, 0]),
            sh.astype("<u2").view(np.uint8).reshape(nb, 2),
            pack_nibbles(sl[:, :, 0], sl[:, :, 1]),
            qs,
        ],
        axis=1,
    )


def dequantize_iq4_xs(b: np.ndarray) -> np.ndarray:
    d = f16_from(b[:, :2])
    sh = np.ascontiguousarray(b[:, 2:4]).view("<u2").reshape(-1, 1)
    sl = np.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], axis=2).reshape(-1, 8)
    h = ((sh >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
    ls = (sl | (h << 4)).astype(np.int8) - np.int8(32)
    dl = (d * ls.astype(F32))[..., None]
    qs = b[:, 8:136].reshape(-1, 8, 16)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2)
    return (dl * IQ4_VALUES[q]).reshape(-1, QK_K)
