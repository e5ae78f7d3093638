"""llama.cpp's ternary block types, TQ1_0 and TQ2_0: 256 weights ``d * t``, t in {-1, 0, 1},
with one float16 ``d`` per block stored after the codes.

- TQ2_0 (66 bytes, 2.0625 bits/weight): t + 1 in two bits; each 128-weight half of the block
  fills 32 bytes, byte m holding weights m, m + 32, m + 64, m + 96 of the half in bits 0-1,
  2-3, 4-5, 6-7.
- TQ1_0 (54 bytes, 1.6875 bits/weight): five trits per byte. The digits t + 1 of five weights
  make a base-3 number n (the first weight most significant), stored as ceil(n * 256 / 243),
  so that the k-th trit reads back as ((byte * 3^k mod 256) * 3) >> 8. Weights 0-159 fill 32
  bytes (byte m: weights m + 32 i), weights 160-239 16 bytes (byte m: 160 + m + 16 i), and the
  last 16 weights 4 bytes of four trits each (byte j: 240 + j + 4 i), shifted up one trit.

``pack`` writes given codes and block scales (a lowbit ternary weight, as it is); ``quantize``
is llama.cpp's reference quantizer (d = max |x| of the block, t = round(x / d)).
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml_k import F32, f16_bytes, f16_from

QK = 256
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def _base3(digits: np.ndarray, shift: bool = False) -> np.ndarray:
    """(n, k, width) digits in 0..2 -> (n, width) bytes, the first digit most significant."""
    n = (digits.astype(np.uint16) * _POW3[5 - digits.shape[1]:].reshape(1, -1, 1)).sum(1)
    if shift:
        n = n * 3
    return ((n * 256 + 242) // 243).astype(np.uint8)


def _trits(b: np.ndarray, k: int) -> np.ndarray:
    """(n, width) bytes -> (n, k, width) digits 0..2."""
    mul = np.array([1, 3, 9, 27, 81][:k], dtype=np.uint16).reshape(1, -1, 1)
    return ((((b[:, None, :].astype(np.uint16) * mul) & 0xFF) * 3) >> 8).astype(np.int8)


def pack(name: str, t: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Blocks (n, bytes) of codes ``t`` (n, 256) in {-1, 0, 1} with scales ``d`` (n, 1), rounded
    to float16 (the only rounding)."""
    t = np.asarray(t)
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError(f"{name} codes must lie in -1..1")
    q = (t.astype(np.int16) + 1).astype(np.uint8)
    n = q.shape[0]
    if name == "TQ2_0":
        halves = q.reshape(n, 2, 4, 32) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        qs = np.bitwise_or.reduce(halves, axis=2).reshape(n, 64)
        parts = [qs]
    elif name == "TQ1_0":
        parts = [_base3(q[:, :160].reshape(n, 5, 32)), _base3(q[:, 160:240].reshape(n, 5, 16)),
                 _base3(q[:, 240:].reshape(n, 4, 4), shift=True)]
    else:
        raise ValueError(f"{name} is not a ternary block type")
    parts.append(f16_bytes(np.asarray(d, F32).reshape(-1)).reshape(n, 2))
    return np.concatenate(parts, 1)


def unpack(name: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, 256) int8 in {-1, 0, 1}, d (n, 1) float32) of blocks (n, bytes)."""
    n = b.shape[0]
    if name == "TQ2_0":
        qs = b[:, :64].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        q = (qs & 3).reshape(n, QK).astype(np.int8)
    else:
        q = np.concatenate([_trits(b[:, :32], 5).reshape(n, 160),
                            _trits(b[:, 32:48], 5).reshape(n, 80),
                            _trits(b[:, 48:52], 4).reshape(n, 16)], 1)
    return q - np.int8(1), f16_from(b[:, -2:])


def quantize_blocks(name: str, x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's reference quantizer for blocks x (n, 256) (``qw``, an importance, is not
    used: llama.cpp's ternary quantizers take none)."""
    d = np.abs(x).max(1, keepdims=True).astype(F32)
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(F32)
    t = np.clip(np.sign(x * inv) * np.floor(np.abs(x * inv) + F32(0.5)), -1, 1)  # roundf
    return pack(name, t.astype(np.int8), d)


def dequantize_blocks(name: str, b: np.ndarray) -> np.ndarray:
    q, d = unpack(name, b)
    return d * q.astype(F32)
