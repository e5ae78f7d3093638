"""A quantized KV cache that plugs into transformers (``model(..., past_key_values=cache)``,
``model.generate(..., past_key_values=cache)``): ``QuantKVCache`` holds one ``QuantKVLayer``
per decoder layer, each storing its keys and values as ``lowbit.formats.kv`` describes.

A layer keeps three parts (four with a sink: the first tokens, kept as they came): the stored
groups (packed codes with fp16 scales, or float8), the
residual window (the most recent tokens in the model's dtype) and, with ``keep_decoded``, the
decoded values of the stored groups, which are fixed once stored, so evaluation does not decode
the whole cache at every token (the attention reads exactly the same numbers; ``nbytes``
counts only what the format stores). Every update returns the keys and values of all cached
tokens: decoded groups, then the residual window, then the new tokens in full precision (a
token always attends to itself exactly, as in KIVI).

Keys quantized before RoPE (``kvquant-*``): the cache undoes RoPE on the keys it receives
(``formats.kv.undo_rope`` with the model's own rotary embedding at their positions), quantizes
them, and applies RoPE again after decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.arch import head_dim, kv_heads, text_config
from lowbit.errors import LowbitError
from lowbit.formats.kv import (
    IntBlock,
    KVSpec,
    apply_rope,
    dequantize_fp8,
    fp8_scale,
    head_rotation,
    parse_kv,
    quantize_fp8,
    quantize_int,
    undo_rope,
)


class Rope:
    """cos/sin of the model's rotary embedding at any positions (cached as they grow)."""

    def __init__(self, rotary: nn.Module, head_dim: int) -> None:
        self.rotary, self.head_dim = rotary, head_dim
        self.cos = self.sin = None

    def at(self, start: int, end: int, like: Tensor) -> tuple[Tensor, Tensor]:
        if self.cos is None or self.cos.shape[1] < end:
            n = max(end, 2 * (0 if self.cos is None else self.cos.shape[1]))
            pos = torch.arange(n, device=like.device)[None]
            with torch.no_grad():
                cos, sin = self.rotary(like.float(), pos)
            if cos.shape[-1] != self.head_dim:
                raise LowbitError("kvquant: the rotary embedding covers part of each head "
                                  "(partial rotary); keys before RoPE are not supported here")
            self.cos, self.sin = cos.float(), sin.float()
        return self.cos[:, start:end], self.sin[:, start:end]


class QuantKVLayer(DynamicLayer):
    """One decoder layer's quantized keys and values (see the module docstring)."""

    is_croppable = False

    def __init__(self, spec: KVSpec, rope: Rope | None = None, keep_decoded: bool = False,
                 scales: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__()
        self.spec, self.rope, self.keep_decoded = spec, rope, keep_decoded
        self.fp8_scales = scales  # (k, v): (kv_heads,) or () for fp8
        self.stored = 0  # tokens in the stored groups
        self.sink_k: Tensor | None = None  # the first tokens, kept (spec.sink)
        self.sink_v: Tensor | None = None
        self.k_blocks: list = []
        self.v_blocks: list = []
        self.dk: Tensor | None = None  # decoded stored keys (post-RoPE) when keep_decoded
        self.dv: Tensor | None = None
        self.rot: Tensor | None = None  # spec.rotate: the head rotation

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.spec.fp8 is not None and self.fp8_scales is None:
            raise LowbitError(f"KV cache {self.spec.name}: float8 needs scales from calibration "
                              "(lowbit.runtime.kvcache.calibrate_kv)")

    # -- storing ------------------------------------------------------------------------

    def _encode(self, k: Tensor, v: Tensor, start: int) -> None:
        s, dtype = self.spec, k.dtype
        if s.fp8 is not None:
            ks, vs = (x.float().reshape(1, -1, 1, 1) if x.dim() else x.float()
                      for x in self.fp8_scales)  # type: ignore[union-attr]
            self.k_blocks.append((quantize_fp8(k, ks, s.fp8), ks))
            self.v_blocks.append((quantize_fp8(v, vs, s.fp8), vs))
        else:
            if s.pre_rope:
                cos, sin = self.rope.at(start, start + k.shape[-2], k)  # type: ignore[union-attr]
                k = undo_rope(k, cos, sin)
            if s.rotate:
                if self.rot is None:
                    self.rot = head_rotation(k.shape[-1])
                k, v = k.float() @ self.rot, v.float() @ self.rot
            self.k_blocks.append(quantize_int(k, s.k_bits, -2 if s.k_per_channel else -1,
                                              s.group, s.outliers))
            self.v_blocks.append(quantize_int(v, s.v_bits, -1, s.group, s.outliers))
        if self.keep_decoded:
            dk, dv = self._decode_block(len(self.k_blocks) - 1, start, dtype)
            self.dk = dk if self.dk is None else torch.cat([self.dk, dk], -2)
            self.dv = dv if self.dv is None else torch.cat([self.dv, dv], -2)

    def _decode_block(self, i: int, start: int, dtype) -> tuple[Tensor, Tensor]:
        kb, vb = self.k_blocks[i], self.v_blocks[i]
        if self.spec.fp8 is not None:
            return dequantize_fp8(*kb, dtype), dequantize_fp8(*vb, dtype)
        k, v = kb.decode(torch.float32), vb.decode(torch.float32)
        if self.rot is not None:
            k, v = k @ self.rot.T, v @ self.rot.T
        k, v = k.to(dtype), v.to(dtype)
        if self.spec.pre_rope:
            cos, sin = self.rope.at(start, start + k.shape[-2], k)  # type: ignore[union-attr]
            k = apply_rope(k, cos, sin)
        return k, v

    def _decoded(self, dtype) -> tuple[Tensor | None, Tensor | None]:
        if self.keep_decoded or not self.k_blocks:
            return self.dk, self.dv
        ks, vs, start = [], [], self.sink_len
        for i in range(len(self.k_blocks)):
            k, v = self._decode_block(i, start, dtype)
            ks.append(k)
            vs.append(v)
            start += k.shape[-2]
        return torch.cat(ks, -2), torch.cat(vs, -2)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        dk, dv = self._decoded(key_states.dtype)
        keys = torch.cat([t for t in (self.sink_k, dk, self.keys, key_states) if t is not None],
                         -2)
        values = torch.cat([t for t in (self.sink_v, dv, self.values, value_states)
                            if t is not None], -2)
        s = self.spec
        take = min(s.sink - self.sink_len, key_states.shape[-2])
        if take > 0:  # the first tokens stay as they are
            sk, sv = key_states[..., :take, :], value_states[..., :take, :]
            self.sink_k = sk if self.sink_k is None else torch.cat([self.sink_k, sk], -2)
            self.sink_v = sv if self.sink_v is None else torch.cat([self.sink_v, sv], -2)
            key_states, value_states = key_states[..., take:, :], value_states[..., take:, :]
        # the new tokens join the residual window; whole groups beyond it are stored
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        while self.keys.shape[-2] >= s.residual + s.flush:
            n = s.flush
            if s.flush == 1:  # per-token formats store everything beyond the window at once
                n = self.keys.shape[-2] - s.residual
            self._encode(self.keys[..., :n, :], self.values[..., :n, :],
                         self.sink_len + self.stored)
            self.stored += n
            self.keys = self.keys[..., n:, :].clone()
            self.values = self.values[..., n:, :].clone()
        return keys, values

    @property
    def sink_len(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[-2]

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_len + self.stored + self.keys.shape[-2]

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``stored`` (the format's codes and scales), ``residual`` (the window in
        full precision); the decoded copy (``keep_decoded``) is not the format's and not
        counted."""
        stored = 0
        for b in (*self.k_blocks, *self.v_blocks):
            if isinstance(b, IntBlock):
                stored += b.nbytes()
            else:
                stored += b[0].numel() * b[0].element_size()
        stored += sum(4 * s.numel() for s in (self.fp8_scales or ()))
        residual = 0 if not self.is_initialized else \
            self.keys.numel() * self.keys.element_size() * 2
        if self.sink_k is not None:
            residual += self.sink_k.numel() * self.sink_k.element_size() * 2
        return {"stored": stored, "residual": residual}

    def reset(self) -> None:
        super().reset()
        self.stored, self.k_blocks, self.v_blocks, self.dk, self.dv = 0, [], [], None, None
        self.sink_k = self.sink_v = None

    def crop(self, tokens_to_remove: int) -> None:
        raise LowbitError("a quantized KV cache cannot be cropped")

    def reorder_cache(self, beam_idx) -> None:
        raise LowbitError("a quantized KV cache does not support beam search")


def _model_parts(model: nn.Module) -> tuple[int, int, int]:
    """Layers, KV heads and head size of a model whose every layer is full attention."""
    cfg = text_config(model)
    types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise LowbitError(f"{cfg.model_type}: sliding-window or linear-attention layers are not "
                          "supported by lowbit's quantized KV cache yet")
    return cfg.num_hidden_layers, kv_heads(cfg), head_dim(cfg)


def rotary_of(model: nn.Module) -> nn.Module:
    found = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
    if len(found) != 1:
        raise LowbitError("kvquant: keys before RoPE need the model's one rotary embedding; "
                          f"found {len(found)}")
    return found[0]


class QuantKVCache(Cache):
    """transformers' ``Cache`` with a ``QuantKVLayer`` per decoder layer."""

    def __init__(self, model: nn.Module, spec: KVSpec | str, keep_decoded: bool = False,
                 scales: list[tuple[Tensor, Tensor]] | None = None) -> None:
        spec = parse_kv(spec) if isinstance(spec, str) else spec
        if not spec.quantized:
            raise LowbitError("QuantKVCache needs a quantized format; use transformers' "
                              "DynamicCache for a full-precision cache")
        n, kv, d = _model_parts(model)
        rope = Rope(rotary_of(model), d) if spec.pre_rope else None
        if spec.fp8 is not None and scales is None:
            raise LowbitError(f"KV cache {spec.name}: float8 needs scales from calibration")
        self.spec, self.kv_heads, self.head_dim = spec, kv, d
        layers = [QuantKVLayer(spec, rope, keep_decoded, None if scales is None else scales[i])
                  for i in range(n)]
        super().__init__(layers=layers)

    def nbytes(self) -> dict[str, int]:
        out = {"stored": 0, "residual": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                out[k] += v
        return out


class _Recorder(DynamicLayer):
    """Keeps the running max |k| and |v| per kv head (fp8 calibration) and caches normally."""

    def __init__(self) -> None:
        super().__init__()
        self.k_amax: Tensor | None = None
        self.v_amax: Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        k = key_states.detach().float().abs().amax(dim=(0, 2, 3))
        v = value_states.detach().float().abs().amax(dim=(0, 2, 3))
        self.k_amax = k if self.k_amax is None else torch.maximum(self.k_amax, k)
        self.v_amax = v if self.v_amax is None else torch.maximum(self.v_amax, v)
        return super().update(key_states, value_states, *args, **kwargs)


@torch.no_grad()
def calibrate_kv(model: nn.Module, spec: KVSpec, windows: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Static float8 scales per layer (per kv head with ``per_head``, else one per layer) from
    the largest |key| and |value| seen on ``windows`` (n, seq_len)."""
    if spec.fp8 is None:
        return []
    n, _, _ = _model_parts(model)
    amax = [[None, None] for _ in range(n)]
    for w in windows:
        recs = [_Recorder() for _ in range(n)]
        model(input_ids=w[None], cache=Cache(layers=recs), use_cache=True)
        for i, r in enumerate(recs):
            for j, a in enumerate((r.k_amax, r.v_amax)):
                amax[i][j] = a if amax[i][j] is None else torch.maximum(amax[i][j], a)
    out = []
    for k, v in amax:
        if not spec.per_head:
            k, v = k.max(), v.max()
        out.append((fp8_scale(k, spec.fp8), fp8_scale(v, spec.fp8)))
    return out


def kv_bytes_formula(n_layers: int, kv_heads: int, head_dim: int, bytes_per_value: float) -> float:
    """Bytes per token of the whole cache: ``2 * n_layers * H_kv * d_head * bytes`` (the
    reference documents' formula without the context length)."""
    return 2 * n_layers * kv_heads * head_dim * bytes_per_value
