"""Architecture knowledge as data: one table per model family.

Each table names the decoder blocks, the Linears of a block in true-sequential groups (a
group's Linears share one input), which norm feeds which Linears and which Linear feeds
which (needed to fold scales). Adding a family is a few lines.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import Tensor, nn

from lowbit.errors import LowbitError

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]  # Linears per true-sequential step, sharing an input
    norm_feeds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    linear_feeds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    conv1d: bool = False  # GPT-2 style Conv1D stores weights as (in, out)
    # (norm, mlp) when the block is ``h = x + attn(...)`` with groups[1] the attention's last
    # Linear, then ``out = h + mlp(norm(h))`` with groups[3] the MLP's last Linear. The driver
    # then resumes from captured tensors instead of re-running the block for every group.
    mlp_path: tuple[str, str] | None = None
    # the norms compute ``x_normed * (norm_offset + weight)`` (Gemma: 1.0); folding a scale into
    # a norm must divide ``norm_offset + weight``, not ``weight``
    norm_offset: float = 0.0
    # modules that turn the last block's output into lm_head's input, in order (absent ones,
    # such as OPT's optional project_out, are skipped)
    head_path: tuple[str, ...] = ("model.norm",)
    # multimodal models: the language model (a ``*Model`` with ``embed_tokens``, the blocks and
    # the final norm) under which the blocks sit; "" for a causal LM. Everything outside it
    # and lm_head (vision tower, projector) is neither quantized nor written to GGUF.
    text_model: str = ""

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)


_LLAMA_LIKE = dict(
    groups=(ATTN, ("self_attn.o_proj",), GATE_UP, ("mlp.down_proj",)),
    norm_feeds={"input_layernorm": ATTN, "post_attention_layernorm": GATE_UP},
    linear_feeds={"self_attn.v_proj": ("self_attn.o_proj",), "mlp.up_proj": ("mlp.down_proj",)},
    mlp_path=("post_attention_layernorm", "mlp"),
)

_GEMMA2_LIKE = dict(
    groups=_LLAMA_LIKE["groups"],
    # gemma2/3 normalise the attention output before the residual add, so only the
    # pre-attention and pre-feedforward norms feed Linears directly
    norm_feeds={"input_layernorm": ATTN, "pre_feedforward_layernorm": GATE_UP},
    linear_feeds=_LLAMA_LIKE["linear_feeds"],
    # no mlp_path: post-attention and post-feedforward norms sit between the Linears and the
    # residual adds
    norm_offset=1.0,
)

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "smollm", "smollm3"), "model.layers", **_LLAMA_LIKE),
    ArchSpec("mistral", ("mistral", "mixtral_dense"), "model.layers", **_LLAMA_LIKE),
    ArchSpec("qwen2", ("qwen2", "qwen3"), "model.layers", **_LLAMA_LIKE),
    ArchSpec("gemma", ("gemma",), "model.layers", **_LLAMA_LIKE, norm_offset=1.0),
    ArchSpec("gemma2", ("gemma2", "gemma3_text"), "model.layers", **_GEMMA2_LIKE),
    # Gemma 3 >= 4B (Gemma3ForConditionalGeneration): the language model's blocks; the vision
    # tower and the multimodal projector are no blocks, so they are left as they are
    ArchSpec(
        "gemma3",
        ("gemma3",),
        "model.language_model.layers",
        **_GEMMA2_LIKE,
        head_path=("model.language_model.norm",),
        text_model="model.language_model",
    ),
    ArchSpec(
        "phi3",
        ("phi3",),
        "model.layers",
        groups=(
            ("self_attn.qkv_proj",),
            ("self_attn.o_proj",),
            ("mlp.gate_up_proj",),
            ("mlp.down_proj",),
        ),
        norm_feeds={
            "input_layernorm": ("self_attn.qkv_proj",),
            "post_attention_layernorm": ("mlp.gate_up_proj",),
        },
        mlp_path=("post_attention_layernorm", "mlp"),
    ),
    ArchSpec(
        "opt",
        ("opt",),
        "model.decoder.layers",
        groups=(ATTN, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        norm_feeds={"self_attn_layer_norm": ATTN, "final_layer_norm": ("fc1",)},
        linear_feeds={"self_attn.v_proj": ("self_attn.out_proj",)},
        head_path=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        norm_feeds={"ln_1": ("attn.c_attn",), "ln_2": ("mlp.c_fc",)},
        conv1d=True,
        mlp_path=("ln_2", "mlp"),
        head_path=("transformer.ln_f",),
    ),
)


def supported_families() -> list[str]:
    return sorted({t for s in SPECS for t in s.model_types})


def spec_for(model: nn.Module) -> ArchSpec:
    """The table for a transformers model, or a clear error naming the supported families."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    for spec in SPECS:
        if mtype in spec.model_types:
            return spec
    raise LowbitError(
        f"unsupported model family {mtype!r}; supported: {', '.join(supported_families())}"
    )


def text_config(model: nn.Module):
    """The config of the language model: a multimodal model's ``text_config``, else its own."""
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


class TextModel(nn.Module):
    """A multimodal model's language model as a plain causal LM: ``model`` (embeddings, blocks,
    final norm) and ``lm_head`` are the multimodal model's own modules, ``config`` its text
    config; calling it calls the multimodal model (text only). The vision tower and projector
    are not part of it."""

    def __init__(self, model: nn.Module, path: str) -> None:
        super().__init__()
        self.model = model.get_submodule(path)
        self.lm_head = model.get_output_embeddings()
        self.config = copy.copy(text_config(model))
        self.config._name_or_path = getattr(model.config, "_name_or_path", "")
        self._whole = [model]  # a list: not a submodule, its parameters are not this model's

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, *args, **kwargs):
        return self._whole[0](*args, **kwargs)


def language_model(model: nn.Module) -> nn.Module:
    """The model itself, or a multimodal model's language model (``TextModel``) when its
    family table gives ``text_model``."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    spec = next((s for s in SPECS if mtype in s.model_types), None)
    if spec is None or not spec.text_model:
        return model
    return TextModel(model, spec.text_model)


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    blocks = model.get_submodule(spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise LowbitError(f"{spec.blocks} is not a ModuleList in this {spec.family} model")
    return blocks


def get_weight(module: nn.Module, spec: ArchSpec) -> Tensor:
    """A Linear's weight as (out, in), whatever the module stores (GPT-2's Conv1D: (in, out))."""
    return module.weight.data.T if spec.conv1d else module.weight.data


def set_weight(module: nn.Module, spec: ArchSpec, w: Tensor) -> None:
    target = module.weight.data
    target.copy_((w.T if spec.conv1d else w).to(target.dtype))


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """The quantizable Linears of one block, by their name inside the block."""
    out = {}
    for name in spec.linears:
        try:
            out[name] = block.get_submodule(name)
        except AttributeError as e:
            raise LowbitError(f"{spec.family} block has no module {name!r}") from e
    return out
