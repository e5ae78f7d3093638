"""Lossless packing of b-bit codes (1..8 bits) into bytes or int32 words.

Codes along the last dimension form a little-endian bit stream: code i occupies bits
[i*b, (i+1)*b) of its row. For b = 4 a byte holds codes (2k, 2k+1) as low and high nibble,
and viewed as little-endian int32 words a word holds 8 codes, the first in the lowest bits
(the order GPTQ-style int32 packing uses). Each row is padded to whole bytes (or words).
"""

from __future__ import annotations

import torch

# stored tensors' dtypes by the names safetensors gives them (its format specification): the
# writer of shards (lowbit.io.shards) and the reader of checkpoint maps both use this table
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
}


def packed_bytes(n: int, bits: int, word_bytes: int = 1) -> int:
    nbytes = (n * bits + 7) // 8
    return (nbytes + word_bytes - 1) // word_bytes * word_bytes


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of 1..8 bits can be packed, not {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integer codes in [0, 2^bits) -> (..., ceil(n*bits/8)) uint8. Widths dividing 8
    are OR-ed into bytes directly; others go through a bit stream, a bounded number of rows
    at a time (the stream takes 8 bytes per bit)."""
    _check(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    *lead, n = codes.shape
    nbytes = packed_bytes(n, bits)
    if 8 % bits == 0:
        per = 8 // bits
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, nbytes * per - n))
        c = c.reshape(*lead, nbytes, per)
        out = c[..., 0].clone()
        for k in range(1, per):
            out |= c[..., k] << (k * bits)
        return out
    flat = codes.reshape(-1, n)
    out = torch.empty(flat.shape[0], nbytes, dtype=torch.uint8)
    rows = max(1, (1 << 20) // max(n * bits, 1))
    for i in range(0, flat.shape[0], rows):
        out[i:i + rows] = _pack_stream(flat[i:i + rows], bits, nbytes)
    return out.reshape(*lead, nbytes)


def _pack_stream(codes: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    rows, n = codes.shape
    shifts = torch.arange(bits)
    stream = ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    weights = 1 << torch.arange(8)
    return (stream.reshape(rows, nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (..., nbytes) uint8 -> (..., n) uint8 codes."""
    _check(bits)
    if bits in (1, 2, 4, 8):
        if bits == 8:
            return packed[..., :n].contiguous()
        per = 8 // bits
        mask = (1 << bits) - 1
        parts = [(packed >> (k * bits)) & mask for k in range(per)]
        return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    p = packed.to(torch.int32)
    # a code straddles at most two bytes: read 16 bits starting at its first byte
    start = torch.arange(n) * bits
    byte, off = start // 8, (start % 8).to(torch.int32)
    p = torch.nn.functional.pad(p, (0, 1))
    word = p[..., byte] | (p[..., byte + 1] << 8)
    return ((word >> off) & ((1 << bits) - 1)).to(torch.uint8)


def to_int32_words(packed: torch.Tensor) -> torch.Tensor:
    """View packed bytes (last dim a multiple of 4) as little-endian int32 words."""
    if packed.shape[-1] % 4:
        packed = torch.nn.functional.pad(packed, (0, 4 - packed.shape[-1] % 4))
    return packed.contiguous().view(torch.int32)


def from_int32_words(words: torch.Tensor) -> torch.Tensor:
    return words.contiguous().view(torch.uint8)
