"""ggml block quantization formats with exact ggml/GGUF byte layouts.

`quantize(name, w, importance)` encodes a (rows, cols) float matrix row by row into ggml blocks;
`dequantize(name, data, cols)` decodes them. Supported: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K,
Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, and the ternary TQ1_0, TQ2_0 (`ggml_t`).
`from_codes(name, q, d, m)` writes codes chosen elsewhere (a lowbit integer grid's) and
per-block scales (and mins) into Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks.

Without `importance` the bytes are those `llama-quantize` writes without an imatrix (llama.cpp's
reference quantizers). With `importance` (an imatrix: per column, or per weight) the K-quants and
IQ4 types give llama.cpp's imatrix bytes (`quantize_row_*_impl`: searches with error weights
qw * sqrt(sigma2 + x^2)). Deliberate departures, importance path only: legacy types re-round
their codes against the stored fp16 scale/min (never worse, for any weighting); Q8_0 searches
its scale under the weights (llama.cpp ignores the imatrix there) and never does worse than the
reference under those weights; a group whose importance is all zero falls back to x^2 weights
(llama.cpp would zero it). Values must fit float16 (|w| <= 65504); magnitudes small enough for
a block scale to underflow float16 decode to 0, as in ggml.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lowbit.formats import ggml_k as K
from lowbit.formats import ggml_t as T
from lowbit.formats.ggml_k import F32, f16, f16_bytes, f16_from, fallback_weights, nearest, safe_div

__all__ = ["GGMLType", "GGML_TYPES", "bits_per_weight", "dequantize", "from_codes", "quantize"]


@dataclass(frozen=True)
class GGMLType:
    """A ggml block type: `type_size` bytes hold `block_size` weights."""

    name: str
    type_id: int  # gguf.GGMLQuantizationType value
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q2_K", 10, 256, 84),
        GGMLType("Q3_K", 11, 256, 110),
        GGMLType("Q4_K", 12, 256, 144),
        GGMLType("Q5_K", 13, 256, 176),
        GGMLType("Q6_K", 14, 256, 210),
        GGMLType("IQ4_NL", 20, 32, 18),
        GGMLType("IQ4_XS", 23, 256, 136),
        GGMLType("TQ1_0", 34, 256, 54),
        GGMLType("TQ2_0", 35, 256, 66),
    )
}


def _lookup(name: str) -> GGMLType:
    t = GGML_TYPES.get(str(name).upper()) if isinstance(name, str) else None
    if t is None:
        raise ValueError(f"unknown ggml type {name!r}; known types: {', '.join(GGML_TYPES)}")
    return t


def bits_per_weight(name: str) -> float:
    """Storage cost in bits per weight, scales included (Q4_K -> 4.5)."""
    return _lookup(name).bits_per_weight


def _check_cols(t: GGMLType, cols: int) -> None:
    if cols <= 0 or cols % t.block_size:
        fits = [n for n, u in GGML_TYPES.items() if cols > 0 and cols % u.block_size == 0]
        raise ValueError(
            f"{t.name} needs cols divisible by its block size {t.block_size}, got cols={cols}"
            + (f"; types that fit: {', '.join(fits)}" if fits else "")
        )


# ----------------------------------------------------------------------------- legacy types
# Encoders get x (rows, nblk, 32) float32, qw same shape or None, sigma2 (rows, 1, 1) (mean x^2
# of the row, as llama.cpp's legacy *_impl) and return (rows, nblk, type_size) uint8.


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(fl + (a - fl >= F32(0.5)), v).astype(F32)


def _legacy_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    return fallback_weights(qw * np.sqrt(sigma2 + x * x), x * x)


def _sym(x: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray, nmax: int):
    """Q4_0 / Q5_0: scale d and codes L in [0, 2*nmax)."""
    if qw is None:  # quantize_row_q{4,5}_0_ref: max maps to -nmax, codes by truncation
        mx = K.signed_absmax(x)
        d = mx / F32(-nmax)
        idv = safe_div(F32(1), d, d != 0)
        L = np.clip(np.trunc(x * idv + F32(nmax + 0.5)), 0, 2 * nmax - 1)
        return f16(d), L
    d, L = K.make_qx(x, nmax, _legacy_weights(x, qw, sigma2))
    d = f16(d[..., None])
    L = np.where(d != 0, np.clip(nearest(safe_div(x, d, d != 0)), -nmax, nmax - 1) + nmax, L)
    return d, L


def _affine(x: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray, nmax: int):
    """Q4_1 / Q5_1: scale d, offset m (x ~ d*L + m) and codes L in [0, nmax]."""
    if qw is None:  # quantize_row_q{4,5}_1_ref: min/max range, codes by truncation
        mn, mx = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        d = (mx - mn) / F32(nmax)
        idv = safe_div(F32(1), d, d != 0)
        L = np.clip(np.trunc((x - mn) * idv + F32(0.5)), 0, nmax)
        return f16(d), f16(mn), L
    d, the_min, L = K.make_qkx(x, _legacy_weights(x, qw, sigma2), nmax, -0.9, 0.05, 36, False, True)
    d, m = f16(d[..., None]), f16(-the_min[..., None])
    L = np.where(d != 0, np.clip(nearest(safe_div(x - m, d, d != 0)), 0, nmax), L)
    return d, m, L


def _qh_bits(L: np.ndarray) -> np.ndarray:
    """Fifth bits of 32 codes -> 4 bytes (uint32 little-endian, bit j = code j)."""
    return np.packbits((L.astype(np.uint8) >> 4) & 1, axis=-1, bitorder="little")


def _f16b(d: np.ndarray) -> np.ndarray:
    return f16_bytes(d.reshape(-1)).reshape(*d.shape[:-1], 2)


def _enc_q4_0(x, qw, s2):
    d, L = _sym(x, qw, s2, 8)
    return np.concatenate([_f16b(d), K.pack_nibbles(L[..., :16], L[..., 16:])], -1)


def _enc_q5_0(x, qw, s2):
    d, L = _sym(x, qw, s2, 16)
    return np.concatenate([_f16b(d), _qh_bits(L), K.pack_nibbles(L[..., :16], L[..., 16:])], -1)


def _enc_q4_1(x, qw, s2):
    d, m, L = _affine(x, qw, s2, 15)
    return np.concatenate([_f16b(d), _f16b(m), K.pack_nibbles(L[..., :16], L[..., 16:])], -1)


def _enc_q5_1(x, qw, s2):
    d, m, L = _affine(x, qw, s2, 31)
    qs = K.pack_nibbles(L[..., :16], L[..., 16:])
    return np.concatenate([_f16b(d), _f16b(m), _qh_bits(L), qs], -1)


def _enc_q8_0(x, qw, s2):
    amax = np.abs(x).max(-1, keepdims=True)
    d = amax / F32(127)
    q = _roundf(x * safe_div(F32(1), d, d != 0))  # quantize_row_q8_0_ref
    d = f16(d)
    if qw is not None:  # weighted search over d = amax / (127 + 0.1 i), codes from fp16 d
        w = _legacy_weights(x, qw, s2)
        best = (w * (x - d * q) ** 2).sum(-1, keepdims=True)
        for i in range(-10, 11):
            dc = f16(amax / (F32(127) + F32(0.1) * F32(i)))
            qc = np.clip(nearest(safe_div(x, dc, dc != 0)), -128, 127)
            e = (w * (x - dc * qc) ** 2).sum(-1, keepdims=True)
            better = e < best
            d, q, best = np.where(better, dc, d), np.where(better, qc, q), np.minimum(e, best)
    return np.concatenate([_f16b(d), q.astype(np.int8).view(np.uint8)], -1)


# the codes `from_codes` takes, per type: (lowest, highest)
CODE_RANGE = {"Q4_0": (0, 15), "Q5_0": (0, 31), "Q8_0": (-128, 127), "Q4_1": (0, 15),
              "Q5_1": (0, 31)}
AFFINE = {"Q4_1", "Q5_1"}  # x = d * q + m; the others x = d * (q - offset)


def from_codes(name: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None
               ) -> np.ndarray:
    """The blocks holding codes ``q`` (rows, cols), integers in the type's own range
    (`CODE_RANGE`: Q4_0 0..15 decodes to d * (q - 8), Q5_0 0..31 to d * (q - 16), Q8_0
    -128..127 to d * q, Q4_1 0..15 and Q5_1 0..31 to d * q + m), with per-block scales ``d``
    (rows, cols // 32) and, for Q4_1/Q5_1, mins ``m`` of the same shape. The codes are written as
    they are; d and m are rounded to float16 (ties to even), the only rounding."""
    if name not in CODE_RANGE:
        raise ValueError(f"{name} blocks are not written from codes; types: "
                         f"{', '.join(CODE_RANGE)}")
    q = np.asarray(q)
    rows, cols = q.shape
    _check_cols(GGML_TYPES[name], cols)
    lo, hi = CODE_RANGE[name]
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"{name} codes must lie in {lo}..{hi}")
    nblk = cols // 32
    L = q.reshape(rows, nblk, 32)
    d = np.asarray(d, dtype=F32).reshape(rows, nblk, 1)
    parts = [_f16b(d)]
    if name in AFFINE:
        if m is None:
            raise ValueError(f"{name} blocks need their mins")
        parts.append(_f16b(np.asarray(m, dtype=F32).reshape(rows, nblk, 1)))
    if name == "Q8_0":
        parts.append(L.astype(np.int8).view(np.uint8))
    else:
        if name in ("Q5_0", "Q5_1"):
            parts.append(_qh_bits(L))
        parts.append(K.pack_nibbles(L[..., :16], L[..., 16:]))
    return np.concatenate(parts, -1).reshape(rows, -1)


def _dec_q8_0(b):
    return b[:, 2:].view(np.int8).astype(F32) * f16_from(b[:, :2])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _fifth(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def _dec_q4_0(b):
    return f16_from(b[:, :2]) * (_nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)).astype(F32)


def _dec_q4_1(b):
    return f16_from(b[:, :2]) * _nibbles(b[:, 4:]).astype(F32) + f16_from(b[:, 2:4])


def _dec_q5_0(b):
    q = (_nibbles(b[:, 6:]) | _fifth(b[:, 2:6])).astype(np.int8) - np.int8(16)
    return f16_from(b[:, :2]) * q.astype(F32)


def _dec_q5_1(b):
    q = (_nibbles(b[:, 8:]) | _fifth(b[:, 4:8])).astype(F32)
    return f16_from(b[:, :2]) * q + f16_from(b[:, 2:4])


# ----------------------------------------------------------------------------- dispatch

_Enc = Callable[..., np.ndarray]
_LEGACY: dict[str, _Enc] = {
    "Q4_0": _enc_q4_0,
    "Q4_1": _enc_q4_1,
    "Q5_0": _enc_q5_0,
    "Q5_1": _enc_q5_1,
    "Q8_0": _enc_q8_0,
}
_BLOCKWISE: dict[str, _Enc] = {  # x (n_blocks, block_size) -> (n_blocks, type_size)
    "Q2_K": K.quantize_q2_k,
    "Q3_K": K.quantize_q3_k,
    "Q4_K": K.quantize_q4_k,
    "Q5_K": K.quantize_q5_k,
    "Q6_K": K.quantize_q6_k,
    "IQ4_NL": K.quantize_iq4_nl,
    "IQ4_XS": K.quantize_iq4_xs,
    "TQ1_0": lambda x, qw: T.quantize_blocks("TQ1_0", x),
    "TQ2_0": lambda x, qw: T.quantize_blocks("TQ2_0", x),
}
_DECODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_0": _dec_q4_0,
    "Q4_1": _dec_q4_1,
    "Q5_0": _dec_q5_0,
    "Q5_1": _dec_q5_1,
    "Q8_0": _dec_q8_0,
    "Q2_K": K.dequantize_q2_k,
    "Q3_K": K.dequantize_q3_k,
    "Q4_K": K.dequantize_q4_k,
    "Q5_K": K.dequantize_q5_k,
    "Q6_K": K.dequantize_q6_k,
    "IQ4_NL": K.dequantize_iq4_nl,
    "IQ4_XS": K.dequantize_iq4_xs,
    "TQ1_0": lambda b: T.dequantize_blocks("TQ1_0", b),
    "TQ2_0": lambda b: T.dequantize_blocks("TQ2_0", b),
}
_FP16_MAX = 65504.0
_CHUNK = 1 << 18  # weights per encoding pass: bounds the search's temporary memory


def quantize(name: str, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Encode w (rows, cols) into ggml blocks: uint8 (rows, cols // block_size * type_size).

    importance: optional non-negative error weights, per column (cols,) or per weight
    (rows, cols), e.g. an imatrix (mean squared activation per input channel).
    """
    t = _lookup(name)
    x = np.asarray(w)
    if x.ndim != 2:
        raise ValueError(f"w must be a 2-D (rows, cols) array, got shape {x.shape}")
    rows, cols = x.shape
    _check_cols(t, cols)
    x = x.astype(F32)
    if not np.isfinite(x).all():
        raise ValueError("w contains NaN or inf")
    if x.size and np.abs(x).max() > _FP16_MAX:
        raise ValueError(f"|w| exceeds {_FP16_MAX:g}: ggml blocks store float16 scales and mins")
    qw = None
    if importance is not None:
        qw = np.asarray(importance, dtype=F32)
        if qw.shape not in ((cols,), (rows, cols)):
            raise ValueError(f"importance must have shape ({cols},) or {x.shape}, got {qw.shape}")
        if not np.isfinite(qw).all() or (qw < 0).any():
            raise ValueError("importance must be finite and non-negative")
        qw = np.broadcast_to(qw, x.shape)
    nblk = cols // t.block_size
    out = np.empty((rows, nblk * t.type_size), dtype=np.uint8)
    step = max(1, _CHUNK // cols)
    for r0 in range(0, rows, step):
        xr = x[r0 : r0 + step]
        qr = None if qw is None else np.ascontiguousarray(qw[r0 : r0 + step])
        n = xr.shape[0]
        with np.errstate(all="ignore"):  # searches mask their non-finite intermediates
            enc = _encode(t, xr, qr)
        out[r0 : r0 + n] = enc.reshape(n, -1)
    return out


def _encode(t: GGMLType, xr: np.ndarray, qr: np.ndarray | None) -> np.ndarray:
    n, cols = xr.shape
    nblk = cols // t.block_size
    if t.name in _LEGACY:
        sigma2 = (K.seq_sum(xr * xr) / F32(cols)).reshape(n, 1, 1)
        xb = xr.reshape(n, nblk, t.block_size)
        qb = None if qr is None else qr.reshape(xb.shape)
        return _LEGACY[t.name](xb, qb, sigma2)
    xb = xr.reshape(n * nblk, t.block_size)
    qb = None if qr is None else qr.reshape(xb.shape)
    return _BLOCKWISE[t.name](xb, qb)


def dequantize(name: str, data: np.ndarray, cols: int) -> np.ndarray:
    """Decode ggml blocks uint8 (rows, nbytes) into float32 (rows, cols)."""
    t = _lookup(name)
    _check_cols(t, int(cols))
    b = np.asarray(data)
    nbytes = cols // t.block_size * t.type_size
    if b.dtype != np.uint8 or b.ndim != 2 or b.shape[1] != nbytes:
        raise ValueError(
            f"{t.name} data for cols={cols} must be uint8 (rows, {nbytes}), got {b.dtype} {b.shape}"
        )
    rows = b.shape[0]
    blocks = np.ascontiguousarray(b).reshape(-1, t.type_size)
    return _DECODERS[t.name](blocks).astype(F32, copy=False).reshape(rows, cols)
