"""KV-cache formats: how keys and values are rounded and stored, and their names.

Keys and values are tensors ``(batch, kv_heads, tokens, head_dim)``. The reference documents'
rule (KIVI, KVQuant): a key's outliers sit in fixed channels, so keys are quantized **per
channel** (one scale and zero point per channel over a group of ``group`` tokens); a value's
vary by token, so values are quantized **per token** (one scale and zero point per token and
head, over groups of ``group`` channels when that divides the head, as KIVI groups both). The
most recent tokens stay in full precision (the residual window) and are flushed a group at a
time. Integer codes are asymmetric (min-max, zero point), packed ``bits`` per code;
scales and minimums are stored in fp16. FP8 stores each element as float8 with one scale per
layer (``fp8``) or per layer and head (``fp8-head``), measured on calibration text.

Names (``parse_kv``):

- ``fp16`` / ``none``: no quantization (transformers' own cache);
- ``int8``: keys and values per token (groups of 32 channels), 8 bits, no residual window;
- ``fp8``, ``fp8-e5m2``, ``fp8-head``, ``fp8-e5m2-head``: float8 E4M3 (or E5M2), static scales;
- ``kivi-k<b>v<b>-r<R>[-g<G>]``: KIVI: keys per channel in groups of G tokens (32), values per
  token in groups of G channels, R recent tokens in full precision;
- ``kvquant-k<b>v<b>-r<R>[-g<G>]``: the same with keys quantized before RoPE (KVQuant), RoPE
  applied again after decoding;
- ``pertoken-k<b>v<b>-r<R>``: keys per token as well (the ablation that shows why KIVI does
  not);
- ``-s<N>`` after any of these keeps the first N tokens in full precision (the attention sink,
  as KVQuant keeps the first token);
- ``-o<P>`` after any of these keeps P percent of each stored block's entries exactly (fp16
  value and position: KVQuant's dense-and-sparse split), those that widen their slice's range
  most, so the other entries of the slice round on a narrower grid (``quantize_int``);
- ``-h`` last: keys and values are multiplied by a randomised Hadamard matrix of the head size
  (``head_rotation``, seed 0) before they are rounded and by its transpose after decoding
  (QuaRot's R3 on keys, and the online form of R2 on values): ``q (k R)^T = q k^T`` would let
  an attention kernel rotate the query instead, so the cache holds rotated keys whose
  outlier channels are spread over the head. The bytes do not change.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.pack import pack, packed_bytes, unpack

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
KV_EXAMPLES = ("int8", "fp8", "fp8-head", "kivi-k4v4-r128", "kivi-k2v2-r128",
               "kvquant-k2v2-r128", "pertoken-k2v2-r128")


@dataclass(frozen=True)
class KVSpec:
    name: str
    k_bits: int = 16
    v_bits: int = 16
    k_per_channel: bool = True  # else per token
    residual: int = 0  # recent tokens kept in full precision
    group: int = 32  # tokens per group of per-channel keys (flushed together)
    pre_rope: bool = False
    fp8: str | None = None  # e4m3 / e5m2
    per_head: bool = False  # fp8: a scale per kv head, else per layer
    sink: int = 0  # first tokens kept in full precision (the attention sink)
    outliers: float = 0.0  # fraction of each stored block's entries kept exactly
    rotate: bool = False  # a Hadamard of the head size on keys and values before rounding

    @property
    def quantized(self) -> bool:
        return self.fp8 is not None or self.k_bits < 16

    @property
    def flush(self) -> int:
        """Tokens quantized at once: a key group when keys are per channel, else one."""
        return self.group if self.k_per_channel and self.fp8 is None else 1

    def bytes_per_token(self, kv_heads: int, head_dim: int) -> float:
        """Stored bytes per token and layer of a quantized token (codes and scales; the
        residual window is extra and counted by the cache)."""
        if not self.quantized:
            return 2 * kv_heads * head_dim * 2.0
        if self.fp8 is not None:
            return 2.0 * kv_heads * head_dim
        per_head = 0.0
        for bits, chan in ((self.k_bits, self.k_per_channel), (self.v_bits, False)):
            groups = channel_groups(head_dim, self.group)
            codes = packed_bytes(head_dim, bits) if chan else \
                groups * packed_bytes(head_dim // groups, bits)
            # fp16 scale and minimum: per channel over ``group`` tokens, or per token and group
            scales = 2 * 2 * (head_dim / self.group if chan else groups)
            per_head += codes + scales
        # an exact entry: its fp16 value and an int16 position (int32 in blocks of 32k+)
        per_head += 2 * self.outliers * head_dim * (2 + 2)
        return kv_heads * per_head


_INT = re.compile(r"^(kivi|kvquant|pertoken)-k(\d)v(\d)-r(\d+)(?:-g(\d+))?(?:-s(\d+))?"
                  r"(?:-o(\d+(?:\.\d+)?))?(-h)?$")


def parse_kv(name: str) -> KVSpec:
    """A ``KVSpec`` from its name (the module docstring lists them); one-line errors."""
    n = str(name).strip().lower()
    if n in ("fp16", "none", "bf16", "fp32"):
        return KVSpec("fp16")
    if n == "int8":
        return KVSpec(n, 8, 8, k_per_channel=False)
    m = re.fullmatch(r"fp8(-e4m3|-e5m2)?(-head)?", n)
    if m:
        return KVSpec(n, 8, 8, k_per_channel=False, fp8=(m.group(1) or "-e4m3")[1:],
                      per_head=bool(m.group(2)))
    m = _INT.match(n)
    if m:
        kind, kb, vb, r, g, sink, out, rot = m.groups()
        kb, vb, r, g = int(kb), int(vb), int(r), int(g or 32)
        if not (1 <= kb <= 8 and 1 <= vb <= 8):
            raise LowbitError(f"KV cache {name!r}: bits per code are 1..8")
        if g < 1 or (kind != "pertoken" and r % g):
            raise LowbitError(f"KV cache {name!r}: the residual window ({r}) must be a multiple "
                              f"of the key group ({g} tokens)")
        if out is not None and not 0 < float(out) < 50:
            raise LowbitError(f"KV cache {name!r}: -o gives the percent of entries kept exactly, "
                              "above 0 and below 50")
        return KVSpec(n, kb, vb, k_per_channel=kind != "pertoken", residual=r, group=g,
                      pre_rope=kind == "kvquant", sink=int(sink or 0),
                      outliers=float(out or 0) / 100, rotate=bool(rot))
    raise LowbitError(f"unknown KV-cache format {name!r}; e.g. {', '.join(KV_EXAMPLES)}")


# -- integer codes --------------------------------------------------------------------------


@dataclass
class IntBlock:
    """Asymmetric integer codes of one stored piece: ``x = code * scale + minimum``. Codes are
    packed along the last axis; ``scale``/``minimum`` (fp16) broadcast against the codes. A
    per-token piece in groups of channels holds its last axis as (groups, group)."""

    codes: Tensor  # uint8, packed along the last axis
    scale: Tensor
    minimum: Tensor
    bits: int
    n: int  # length of the last axis before packing
    grouped: bool = False
    exact_pos: Tensor | None = None  # flat positions of the entries kept exactly (int16/32)
    exact_val: Tensor | None = None  # their values (fp16)

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        q = unpack(self.codes, self.bits, self.n).to(torch.float32)
        x = q * self.scale.float() + self.minimum.float()
        if self.exact_pos is not None:
            x.view(-1)[self.exact_pos.long()] = self.exact_val.float()
        return (x.flatten(-2) if self.grouped else x).to(dtype)

    def nbytes(self) -> int:
        parts = [self.codes, self.scale, self.minimum]
        if self.exact_pos is not None:
            parts += [self.exact_pos, self.exact_val]
        return sum(t.numel() * t.element_size() for t in parts)


def channel_groups(head_dim: int, group: int) -> int:
    """Groups of channels a per-token scale covers: ``group`` channels each when that divides
    the head, else the whole head in one."""
    return head_dim // group if 0 < group < head_dim and head_dim % group == 0 else 1


EXACT_DEPTH = 4  # entries per end of a slice that may be kept exactly


def exact_entries(xf: Tensor, dim: int, fraction: float) -> Tensor:
    """Flat positions of the ``fraction`` of entries of ``xf`` whose removal narrows their
    slice's (along ``dim``) min-max range the most. The j-th largest entry of a slice scores
    its height above the slice's (EXACT_DEPTH+1)-th largest (the j-th smallest, its depth below
    the (EXACT_DEPTH+1)-th smallest): the score falls with j, so the entries chosen at each end
    of a slice are always its most extreme ones, and each entry's score is what keeping it
    and every entry beyond it exactly takes off the range."""
    k = int(round(fraction * xf.numel()))
    n = xf.shape[dim]
    depth = min(EXACT_DEPTH, (n - 1) // 2)
    if k == 0 or depth == 0:
        return torch.empty(0, dtype=torch.long)
    vals, order = xf.sort(dim=dim)
    top = vals.narrow(dim, n - depth, depth) - vals.narrow(dim, n - depth - 1, 1)
    bottom = vals.narrow(dim, depth, 1) - vals.narrow(dim, 0, depth)
    score = torch.cat([top, bottom], dim)
    where = torch.cat([order.narrow(dim, n - depth, depth), order.narrow(dim, 0, depth)], dim)
    # the flat position in xf of every candidate
    idx = torch.arange(xf.numel()).reshape(xf.shape)
    pos = idx.gather(dim, where)
    best = score.flatten().topk(min(k, score.numel())).indices
    return pos.flatten()[best]


def quantize_int(x: Tensor, bits: int, dim: int, group: int = 0,
                 outliers: float = 0.0) -> IntBlock:
    """Min-max asymmetric ``bits``-bit codes of x with one scale and minimum per slice along
    ``dim`` (reduced over it): ``dim=-2`` is per channel (over tokens), ``dim=-1`` per token
    (over each ``group`` channels: ``channel_groups``). The stored fp16 scale and minimum are
    the ones the codes are computed with. ``outliers``: that fraction of the entries is kept
    exactly (``exact_entries``), and the ranges are those of the others."""
    xf = x.float()
    grouped = dim == -1 and channel_groups(x.shape[-1], group) > 1
    if grouped:
        xf = xf.unflatten(-1, (channel_groups(x.shape[-1], group), group))
    pos = val = None
    low = high = xf  # the entries the ranges are taken over
    if outliers > 0:
        pos = exact_entries(xf, dim, outliers)
        val = xf.reshape(-1)[pos].half()
        exact = torch.zeros(xf.numel(), dtype=torch.bool)
        exact[pos] = True
        exact = exact.reshape(xf.shape)
        low, high = xf.masked_fill(exact, float("inf")), xf.masked_fill(exact, float("-inf"))
        pos = pos.to(torch.int16 if xf.numel() <= 32767 else torch.int32)
    lo = low.amin(dim, keepdim=True).half().float()
    hi = high.amax(dim, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((xf - lo) / scale).clamp(0, qmax).to(torch.uint8)
    return IntBlock(pack(q, bits), scale.half(), lo.half(), bits, xf.shape[-1], grouped, pos, val)


# -- float8 ---------------------------------------------------------------------------------


def fp8_scale(amax: Tensor, fmt: str) -> Tensor:
    """The static scale that maps ``amax`` to the format's largest finite value."""
    top = torch.finfo(FP8[fmt]).max
    return torch.where(amax > 0, amax.float() / top, torch.ones_like(amax, dtype=torch.float32))


def quantize_fp8(x: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """x / scale in float8 (values beyond the range saturate: calibration may miss a peak)."""
    top = torch.finfo(FP8[fmt]).max
    return (x.float() / scale).clamp(-top, top).to(FP8[fmt])


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scale).to(dtype)


@functools.cache
def head_rotation(head_dim: int) -> Tensor:
    """The ``-h`` rotation: ``lowbit.formats.hadamard.rotation(head_dim, 0)`` in fp32 (a
    randomised Hadamard matrix; a random orthogonal one where no Hadamard of that order is
    known). Keys and values are stored as ``x R`` and decoded as ``x_hat R^T``."""
    from lowbit.formats.hadamard import rotation

    return rotation(head_dim, 0)[0].float()


# -- RoPE, for keys quantized before it -----------------------------------------------------


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' rotary embedding (``x cos + rotate_half(x) sin``), cos/sin (B, L, d);
    computed in fp32 at least."""
    f = torch.promote_types(x.dtype, torch.float32)
    cos, sin, xf = cos.unsqueeze(1).to(f), sin.unsqueeze(1).to(f), x.to(f)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def undo_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The key before ``apply_rope``: per pair of channels RoPE multiplies by a rotation times
    ``a = sqrt(cos^2 + sin^2)`` (models with attention scaling fold ``a`` into cos and sin), so
    its inverse is ``(x cos - rotate_half(x) sin) / a^2``."""
    f = torch.promote_types(x.dtype, torch.float32)
    cos, sin, xf = cos.unsqueeze(1).to(f), sin.unsqueeze(1).to(f), x.to(f)
    return ((xf * cos - rotate_half(xf) * sin) / (cos * cos + sin * sin)).to(x.dtype)


# -- what the serving stacks call the nearest cache ------------------------------------------

LLAMACPP_TYPES = {4: "q4_1", 5: "q5_1", 8: "q8_0"}  # llama.cpp cache types by bits per code


def llamacpp_cache_flags(name: str) -> tuple[str, str]:
    """llama.cpp's ``--cache-type-k/-v`` nearest to a KV format, and what differs. llama.cpp
    quantizes both keys and values per token in blocks of 32 channels (q4_1/q5_1: min and
    scale, like these formats' values), with no full-precision window; a quantized V cache
    needs flash attention (``-fa``)."""
    spec = parse_kv(name)
    if not spec.quantized:
        return "--cache-type-k f16 --cache-type-v f16", ""
    if spec.fp8 is not None:
        return ("--cache-type-k q8_0 --cache-type-v q8_0 -fa",
                "llama.cpp has no float8 cache; q8_0 is its 8-bit one (as many bytes)")
    bits = {}
    for part, b in (("k", spec.k_bits), ("v", spec.v_bits)):
        bits[part] = next(t for n, t in sorted(LLAMACPP_TYPES.items()) if n >= b)
    notes = []
    if min(spec.k_bits, spec.v_bits) < 4:
        notes.append("llama.cpp has no cache type under 4 bits")
    if spec.k_per_channel:
        notes.append("its keys are per token, not per channel")
    if spec.residual or spec.sink:
        notes.append("it keeps no full-precision window")
    if spec.outliers:
        notes.append("it keeps no exact outliers")
    if spec.rotate:
        notes.append("it does not rotate the heads")
    return (f"--cache-type-k {bits['k']} --cache-type-v {bits['v']} -fa",
            "; ".join(notes))
