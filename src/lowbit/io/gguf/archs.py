"""What llama.cpp needs to know about each model type lowbit writes as GGUF: one table row per
transformers model type, and the `{arch}.*` hyperparameter keys built from it.

Facts behind the table (from llama.cpp's `convert_hf_to_gguf.py` and model loaders; the
slow suite checks each family's logits against llama.cpp):

- RoPE: llama.cpp's llama architecture (also written for mistral, as its converter does)
  rotates interleaved pairs, so q/k rows are permuted from transformers' rotate-half layout
  (`permute_qk`). qwen2, qwen3, gemma, gemma2, gemma3 and phi3 use llama.cpp's NEOX RoPE,
  which is rotate-half: no permutation. `rope.dimension_count` is
  ``head_dim * partial_rotary_factor`` (phi3 models rotate part of each head).
- Gemma's RMSNorm computes ``x * (1 + w)``; llama.cpp's converter stores ``w + 1`` for every
  weight whose name ends in ``norm.weight``: the block norms (gemma2/3: four per block), the
  final norm and gemma3's q_norm / k_norm. qwen3's q_norm / k_norm are plain.
- gemma and gemma2 have no separate output matrix in llama.cpp (an untied lm_head has no
  tensor name and is refused).
- Logit caps: gemma2 always caps attention and final logits (at 50 and 30 when the file does
  not say), so a gemma2 model without caps is refused; gemma3 caps final logits only when
  `final_logit_softcapping` is written, and never attention logits.
- Sliding windows: gemma2 slides on every other layer (the 1st, 3rd ...), gemma3 on 5 layers
  of 6 (the 6th, 12th ... attend globally, with RoPE base `rope.freq_base`; the sliding ones
  use `rope.freq_base_swa`, transformers' local base). llama.cpp fixes these patterns, so a
  model whose `layer_types` differ is refused. mistral, qwen2 (`use_sliding_window`) and phi3
  attend to the whole context in llama.cpp where transformers slides a window: they agree
  for sequences no longer than the window (the logit checks stay below every window).
- gemma2/gemma3 scale queries by ``1/sqrt(head_dim)``, or ``1/sqrt(hidden/heads)`` for the
  27B models (46 / 62 blocks), not by `query_pre_attn_scalar`: a model whose
  `query_pre_attn_scalar` differs from that number is refused.
- phi3 keeps transformers' fused `qkv_proj` (q, k, v rows stacked; `attn_qkv`) and
  `gate_up_proj` (gate rows, then up rows; `ffn_up`: llama.cpp's SwiGLU gates with the first
  half), so nothing is split or reordered.
- RoPE scaling: none or linear (gemma3: on its global layers only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFValueType, Keys
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.gguf.vocab import KV


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers model type becomes a llama.cpp architecture."""

    model_type: str  # transformers ``config.model_type``
    arch: MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's normal (interleaved) RoPE: permute the q/k rows
    norm_offset: float = 0.0  # added to every ``*norm.weight`` (Gemma: transformers uses 1 + w)
    softcap: tuple[str, ...] = ()  # config logit caps llama.cpp applies when the file has them
    softcap_always: bool = False  # llama.cpp caps even without the keys (gemma2: at 50 and 30)
    sliding_window: bool = False  # write `attention.sliding_window` (0 when the config has none)
    swa_pattern: int = 0  # llama.cpp's fixed layers: i slides iff i % n < n - 1 (0: no SWA)
    swa_rope_base: bool = False  # sliding layers have their own RoPE base (`rope.freq_base_swa`)
    # blocks of the model for which llama.cpp scales queries by 1/sqrt(hidden/heads) rather
    # than 1/sqrt(head_dim) (gemma2/3 27B); 0: transformers has no query_pre_attn_scalar here
    big_query_scale_blocks: int = 0
    norm_topk: bool | None = None  # MoE: the config's norm_topk_prob llama.cpp computes

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


ARCHS: dict[str, GGUFArch] = {
    a.model_type: a
    for a in (
        GGUFArch("llama", MODEL_ARCH.LLAMA, permute_qk=True),
        GGUFArch("mistral", MODEL_ARCH.LLAMA, permute_qk=True),  # as llama.cpp's converter does
        GGUFArch("qwen2", MODEL_ARCH.QWEN2),
        GGUFArch("qwen3", MODEL_ARCH.QWEN3),
        GGUFArch("gemma", MODEL_ARCH.GEMMA, norm_offset=1.0),
        GGUFArch(
            "gemma2",
            MODEL_ARCH.GEMMA2,
            norm_offset=1.0,
            softcap=("attn_logit_softcapping", "final_logit_softcapping"),
            softcap_always=True,
            sliding_window=True,
            swa_pattern=2,
            big_query_scale_blocks=46,
        ),
        GGUFArch(
            "gemma3_text",
            MODEL_ARCH.GEMMA3,
            norm_offset=1.0,
            softcap=("final_logit_softcapping",),
            sliding_window=True,
            swa_pattern=6,
            swa_rope_base=True,
            big_query_scale_blocks=62,
        ),
        GGUFArch("phi3", MODEL_ARCH.PHI3, sliding_window=True),
        # mixture of experts: llama.cpp fixes per architecture whether the top-k routing
        # weights are renormalised (``norm_topk``; Mixtral always renormalises)
        GGUFArch("mixtral", MODEL_ARCH.LLAMA, permute_qk=True),  # as llama.cpp's converter
        GGUFArch("qwen2_moe", MODEL_ARCH.QWEN2MOE, norm_topk=False),
        GGUFArch("qwen3_moe", MODEL_ARCH.QWEN3MOE, norm_topk=True),
    )
}
# config attributes of logit caps; a family that does not list one in ``softcap`` must not set it
_SOFTCAPS = {
    "attn_logit_softcapping": Keys.LLM.ATTN_LOGIT_SOFTCAPPING,
    "final_logit_softcapping": Keys.LLM.FINAL_LOGIT_SOFTCAPPING,
}


def arch_for(model: nn.Module) -> GGUFArch:
    """The table row for ``model``, after checking that llama.cpp computes what it computes;
    a one-line LowbitError otherwise."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    ga = ARCHS.get(mtype)
    if ga is None:
        raise LowbitError(
            f"GGUF export does not support model type {mtype!r}; it writes llama.cpp "
            f"architectures for model types {', '.join(sorted(ARCHS))}"
        )
    _check(cfg, ga)
    return ga


def _check(cfg, ga: GGUFArch) -> None:
    what = f"{ga.model_type} model"
    if getattr(cfg, "use_bidirectional_attention", None):
        raise LowbitError(f"llama.cpp's {ga.name} attends causally; this {what} does not")
    for attr in _SOFTCAPS:
        value = getattr(cfg, attr, None)
        if attr in ga.softcap and ga.softcap_always and value is None:
            raise LowbitError(f"llama.cpp's {ga.name} always applies {attr}; this {what} has none")
        if attr not in ga.softcap and value is not None:
            raise LowbitError(f"llama.cpp's {ga.name} does not apply {attr} (this {what} sets it)")
    if ga.big_query_scale_blocks:
        d = dims(cfg)
        scalar = d.hidden // d.n_head if d.n_layer == ga.big_query_scale_blocks else d.head_dim
        have = getattr(cfg, "query_pre_attn_scalar", None)
        if have is not None and not math.isclose(float(have), float(scalar)):
            raise LowbitError(
                f"llama.cpp's {ga.name} scales queries by 1/sqrt({scalar}) for this shape; this "
                f"{what} has query_pre_attn_scalar {have}"
            )
    n = ga.swa_pattern
    layer_types = getattr(cfg, "layer_types", None)
    if n and layer_types is not None:
        want = ["sliding_attention" if i % n < n - 1 else "full_attention"
                for i in range(len(layer_types))]  # fmt: skip
        if list(layer_types) != want:
            raise LowbitError(
                f"llama.cpp's {ga.name} has sliding (S) / full (F) attention layers "
                f"{_pattern(want)}; this {what} has {_pattern(layer_types)}"
            )
    if ga.norm_topk is not None and bool(getattr(cfg, "norm_topk_prob", False)) != ga.norm_topk:
        raise LowbitError(f"llama.cpp's {ga.name} {'re' if ga.norm_topk else 'does not re'}"
                          f"normalise the top-k routing weights; this {what} has "
                          f"norm_topk_prob={getattr(cfg, 'norm_topk_prob', None)}")
    if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
        raise LowbitError(f"llama.cpp's {ga.name} has experts in every layer; this {what} has "
                          "dense layers (mlp_only_layers / decoder_sparse_step)")
    _rope(cfg)  # unsupported scaling fails here
    if ga.swa_rope_base and _rope(cfg, "sliding_attention")[1]:
        raise LowbitError(f"llama.cpp's {ga.name} does not scale RoPE on sliding layers")


def _pattern(layer_types) -> str:
    return "".join("S" if t == "sliding_attention" else "F" for t in layer_types)


@dataclass(frozen=True)
class Dims:
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    hidden: int


def dims(cfg) -> Dims:
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    return Dims(cfg.num_hidden_layers, n_head, n_kv, head_dim, cfg.hidden_size)


def _rope_params(cfg, layer_type: str | None) -> dict:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if "full_attention" in params or "sliding_attention" in params:  # per layer type (gemma3)
        params = dict(params.get(layer_type or "full_attention") or {})
    elif getattr(cfg, "rope_scaling", None):  # transformers 4
        params = {**cfg.rope_scaling, **params}
    if "rope_theta" not in params:
        local = getattr(cfg, "rope_local_base_freq", None)  # transformers 4 gemma3
        theta = local if layer_type == "sliding_attention" and local else None
        params["rope_theta"] = theta or getattr(cfg, "rope_theta", None) or 10000.0
    return params


def _rope(cfg, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(RoPE base, linear scaling or None) for the given kind of layer."""
    p = _rope_params(cfg, layer_type)
    theta = float(p["rope_theta"])
    kind = p.get("rope_type", p.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(p["factor"])}
    raise LowbitError(f"GGUF export does not support RoPE scaling of type {kind!r}")


def rope_dims(cfg) -> int:
    """How many dimensions of each head are rotated (all unless partial_rotary_factor < 1)."""
    prf = _rope_params(cfg, None).get("partial_rotary_factor")
    prf = prf if prf is not None else getattr(cfg, "partial_rotary_factor", None)
    return int(dims(cfg).head_dim * (1.0 if prf is None else float(prf)))


def arch_kv(model: nn.Module, ga: GGUFArch) -> list[KV]:
    """Architecture hyperparameters under `{arch}.*`."""
    cfg = model.config
    d = dims(cfg)
    theta, scaling = _rope(cfg)
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    n_vocab = int(model.get_input_embeddings().num_embeddings)
    values: list[tuple[str, object, GGUFValueType]] = [
        (Keys.LLM.BLOCK_COUNT, d.n_layer, u32),
        (Keys.LLM.CONTEXT_LENGTH, int(cfg.max_position_embeddings), u32),
        (Keys.LLM.EMBEDDING_LENGTH, d.hidden, u32),
        (Keys.LLM.FEED_FORWARD_LENGTH, int(cfg.intermediate_size), u32),
        (Keys.Attention.HEAD_COUNT, d.n_head, u32),
        (Keys.Attention.HEAD_COUNT_KV, d.n_head_kv, u32),
        (Keys.Attention.KEY_LENGTH, d.head_dim, u32),
        (Keys.Attention.VALUE_LENGTH, d.head_dim, u32),
        (Keys.Rope.FREQ_BASE, theta, f32),
        (Keys.Rope.DIMENSION_COUNT, rope_dims(cfg), u32),
        (Keys.Attention.LAYERNORM_RMS_EPS, float(cfg.rms_norm_eps), f32),
        (Keys.LLM.VOCAB_SIZE, n_vocab, u32),
    ]
    if scaling:
        values.append((Keys.Rope.SCALING_TYPE, scaling["type"], GGUFValueType.STRING))
        values.append((Keys.Rope.SCALING_FACTOR, scaling["factor"], f32))
    original = getattr(cfg, "original_max_position_embeddings", None)
    if original:
        values.append((Keys.Rope.SCALING_ORIG_CTX_LEN, int(original), u32))
    if ga.swa_rope_base:
        values.append((Keys.Rope.FREQ_BASE_SWA, _rope(cfg, "sliding_attention")[0], f32))
    if ga.sliding_window:
        window = getattr(cfg, "sliding_window", None)
        values.append((Keys.Attention.SLIDING_WINDOW, int(window or 0), u32))
    for attr in ga.softcap:
        if getattr(cfg, attr, None) is not None:
            values.append((_SOFTCAPS[attr], float(getattr(cfg, attr)), f32))
    n_expert = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if n_expert:  # mixture of experts
        values.append((Keys.LLM.EXPERT_COUNT, int(n_expert), u32))
        values.append((Keys.LLM.EXPERT_USED_COUNT, int(cfg.num_experts_per_tok), u32))
        for key, attr in ((Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, "moe_intermediate_size"),
                          (Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH,
                           "shared_expert_intermediate_size")):
            if getattr(cfg, attr, None):
                values.append((key, int(getattr(cfg, attr)), u32))
    return [(key.format(arch=ga.name), v, t, None) for key, v, t in values]
