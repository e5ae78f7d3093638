"""A float8 KV cache in a compressed-tensors checkpoint: ``kv_cache_scheme`` in the
``quantization_config`` (8-bit float, symmetric, static; ``tensor`` strategy for one scale per
layer, ``attn_head`` for one per KV head) and the scales as ``<attention>.k_scale`` /
``v_scale`` of each decoder layer's attention module, shaped as compressed-tensors' own
``apply_quantization_config`` registers them ((1,) and (kv_heads, 1, 1)): what vLLM reads.

compressed-tensors' 8-bit float is E4M3; an E5M2 or integer lowbit KV format has no form here
(``kv_cache_scheme`` returns None and the caller says so).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.arch import ArchSpec
from lowbit.errors import LowbitError
from lowbit.formats.kv import parse_kv


def attention_of(spec: ArchSpec) -> str:
    """The attention module of a block (``self_attn``): the parent of its first Linear."""
    return spec.groups[0][0].rpartition(".")[0]


def kv_cache_scheme(record: dict | None) -> dict | None:
    """compressed-tensors' ``kv_cache_scheme`` for a ``kv_cache`` record, or None when the
    format has none (not E4M3 float8, or no scales)."""
    if not record or "scales" not in record:
        return None
    spec = parse_kv(record["format"])
    if spec.fp8 != "e4m3":
        return None
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                            strategy="attn_head" if spec.per_head else "tensor")
    return args.model_dump(mode="json")


def kv_tensors(record: dict, spec: ArchSpec) -> dict[str, Tensor]:
    """``<blocks>.<i>.<attention>.k_scale`` / ``v_scale`` of every layer (fp32)."""
    attn = attention_of(spec)
    out = {}
    for i, pair in enumerate(record["scales"]):
        for name, s in zip(("k_scale", "v_scale"), pair, strict=True):
            t = torch.tensor(s, dtype=torch.float32)
            out[f"{spec.blocks}.{i}.{attn}.{name}"] = t.reshape(-1, 1, 1) if t.dim() else \
                t.reshape(1)
    return out


def read_kv(qcfg: dict, tensors: dict[str, Tensor], spec: ArchSpec | None) -> dict | None:
    """The ``kv_cache`` record of a checkpoint with a ``kv_cache_scheme`` (its scale tensors are
    popped from ``tensors``), or None without one."""
    args = qcfg.get("kv_cache_scheme")
    if not args:
        return None
    if spec is None:
        raise LowbitError("kv_cache_scheme: the model's family is not one lowbit knows")
    if args.get("type") != "float" or args.get("num_bits") != 8 or args.get("dynamic") \
            or not args.get("symmetric", True):
        raise LowbitError(f"kv_cache_scheme {args}: lowbit reads static symmetric 8-bit float "
                          "KV caches (fp8)")
    strategy = args.get("strategy")
    if strategy not in ("tensor", "attn_head"):
        raise LowbitError(f"kv_cache_scheme strategy {strategy!r}: lowbit reads tensor and "
                          "attn_head")
    attn = attention_of(spec)
    scales, i = [], 0
    while f"{spec.blocks}.{i}.{attn}.k_scale" in tensors:
        pair = []
        for name in ("k_scale", "v_scale"):
            key = f"{spec.blocks}.{i}.{attn}.{name}"
            if key not in tensors:
                raise LowbitError(f"kv_cache_scheme: {key} is missing")
            t = tensors.pop(key).float()
            pair.append(t.flatten().tolist() if strategy == "attn_head" else float(t.flatten()[0]))
        scales.append(pair)
        i += 1
    if not scales:
        raise LowbitError("kv_cache_scheme without k_scale/v_scale tensors")
    return {"format": "fp8-head" if strategy == "attn_head" else "fp8", "scales": scales}


def kv_note(fmt: str, name: str) -> str | None:
    """What a ``fmt`` checkpoint does not carry of a ``name`` KV cache, or None: only
    compressed-tensors holds one, and only as E4M3 float8 with static scales."""
    spec = parse_kv(name)
    if not spec.quantized:
        return None
    if fmt == "compressed-tensors" and spec.fp8 == "e4m3":
        return None
    where = "this format has no KV-cache field" if fmt != "compressed-tensors" else \
        "compressed-tensors holds float8 E4M3 KV caches only (fp8, fp8-head)"
    return (f"the {name} KV cache is recorded in lowbit.json but not in the {fmt} checkpoint "
            f"({where}); servers run it with their own cache setting")
