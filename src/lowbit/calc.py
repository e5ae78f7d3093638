"""Memory of a model before it is quantized or loaded: the weights at a scheme's own byte
accounting (scales included) and the KV cache at a context, batch and KV format, from the
model's config alone (the model is built on the meta device: no weights are read).

Block Linears take the scheme; embeddings, lm_head and norms stay 16-bit, as lowbit quantizes
them by default. The KV cache is the reference documents' formula
``L_ctx * 2 * n_layers * H_kv * d_head * bytes`` with the format's stored bytes per token
(``lowbit.formats.kv``), plus its full-precision residual window at 2 bytes per value.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.arch import get_blocks, head_dim, kv_heads, spec_for, text_config
from lowbit.errors import LowbitError
from lowbit.formats.grids import get_grid
from lowbit.formats.kv import parse_kv
from lowbit.runtime.kvcache import kv_bytes_formula


def load_config(model_arg: str):
    """A transformers config from a config.json, a checkpoint or lowbit folder, a GGUF file or
    a built-in model's name."""
    from transformers import AutoConfig

    from lowbit.models import BUILTIN_MODELS, resolve

    path = resolve(model_arg)
    try:
        if path.is_file() and path.suffix == ".json":
            d = json.loads(path.read_text())
            return AutoConfig.for_model(d.pop("model_type"), **d)
        if path.is_file() and path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        what = "built-in model" if str(model_arg) in BUILTIN_MODELS else str(path)
        raise LowbitError(f"no model config in {what}: {str(e).splitlines()[0][:200]}") from None


def _meta_model(cfg) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def calc(cfg, scheme: str | None, kv: str, context: int, batch: int = 1) -> dict:
    """Bytes of the weights (``scheme`` on the block Linears; None: all 16-bit) and of the KV
    cache for ``batch`` sequences of ``context`` tokens."""
    if context < 1 or batch < 1:
        raise LowbitError(f"--context and --batch must be at least 1, not {context} and {batch}")
    spec_kv = parse_kv(kv)
    model = _meta_model(cfg)
    spec = spec_for(model)
    grid = None if scheme is None else get_grid(scheme)
    linear_bytes = other_bytes = 0.0
    quantized = set()
    for block in get_blocks(model, spec):
        for mod in block.modules():
            if isinstance(mod, nn.Linear):
                quantized.add(id(mod.weight))
                out, inp = mod.weight.shape
                if grid is None:
                    linear_bytes += 2.0 * out * inp
                else:
                    grid.check(out, inp)
                    linear_bytes += grid.bits_per_weight(out, inp) * out * inp / 8
    seen = set()
    for p in model.parameters():
        if id(p) in quantized or id(p) in seen:
            continue
        seen.add(id(p))
        other_bytes += 2.0 * p.numel()
    tc = text_config(model)
    layers = tc.num_hidden_layers
    heads, d = kv_heads(tc), head_dim(tc)
    per_token = layers * spec_kv.bytes_per_token(heads, d)
    fp16 = kv_bytes_formula(layers, heads, d, 2)
    # the residual window after ``context`` tokens: groups of ``flush`` leave it once it holds
    # ``residual + flush`` tokens, whatever the order the tokens came in
    r, g = spec_kv.residual, spec_kv.flush
    sink = min(spec_kv.sink, context)
    rest = context - sink
    window = sink + (0 if not spec_kv.quantized else (rest if rest < r + g else
                                                       r + (rest - r) % g))
    stored = context - window
    kv_per_seq = stored * per_token + window * fp16
    out = {
        "model_type": tc.model_type, "scheme": scheme or "16-bit", "kv": spec_kv.name,
        "context": context, "batch": batch,
        "layers": layers, "kv_heads": heads, "head_dim": d,
        "linear_bytes": linear_bytes, "other_bytes": other_bytes,
        "weight_bytes": linear_bytes + other_bytes,
        "kv_bytes_per_token": per_token,
        "kv_fp16_bytes_per_token": fp16,
        "kv_bytes_per_sequence": kv_per_seq,
        "kv_bytes": kv_per_seq * batch,
    }
    out["total_bytes"] = out["weight_bytes"] + out["kv_bytes"]
    return out


def calc_path(model_arg: str | Path, **kw) -> dict:
    return {"model": str(model_arg)} | calc(load_config(str(model_arg)), **kw)
