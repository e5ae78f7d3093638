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
class MoESpec:
    """A mixture-of-experts MLP: where its parts sit in a block (module paths inside the block)
    and how its per-expert Linears are named (transformers fuses them into 3-D parameters;
    ``lowbit.runtime.experts`` turns them back into one nn.Linear per expert)."""

    experts: str = "mlp.experts"
    router: str = "mlp.gate"  # never quantized (not an nn.Linear in transformers 5)
    proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared: str | None = None  # a shared expert MLP (gate_proj, up_proj, down_proj)
    shared_gate: str | None = None  # its sigmoid gate (an nn.Linear(hidden, 1), never quantized)
    # in-memory -> checkpoint name pieces (Mixtral's checkpoints say block_sparse_moe)
    renames: tuple[tuple[str, str], ...] = ()


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
    # mixture-of-experts blocks (the blocks whose ``moe.experts`` exists; others use ``groups``)
    moe: MoESpec | None = None

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

# MoE families: attention as in llama (the tables' AWQ/SmoothQuant feeds cover it only); the
# MLP groups of a MoE block come from ``block_steps``
_MOE_LIKE = dict(
    groups=_LLAMA_LIKE["groups"],  # dense blocks (Qwen's mlp_only_layers)
    norm_feeds={"input_layernorm": ATTN},
    linear_feeds={"self_attn.v_proj": ("self_attn.o_proj",)},
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
    ArchSpec("mixtral", ("mixtral",), "model.layers", **_MOE_LIKE,
             moe=MoESpec(proj=("w1", "w3", "w2"), renames=((".mlp.", ".block_sparse_moe."),))),
    ArchSpec("qwen2_moe", ("qwen2_moe",), "model.layers", **_MOE_LIKE,
             moe=MoESpec(shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate")),
    ArchSpec("qwen3_moe", ("qwen3_moe",), "model.layers", **_MOE_LIKE, moe=MoESpec()),
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


def head_dim(cfg) -> int:
    """Channels per attention head of a (text) config."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_heads(cfg) -> int:
    """Key/value heads of a (text) config (as many as query heads without grouping)."""
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


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
    for name in (n for g in block_groups(block, spec) for n in g):
        try:
            out[name] = block.get_submodule(name)
        except AttributeError as e:
            raise LowbitError(f"{spec.family} block has no module {name!r}") from e
    return out


def has_module(block: nn.Module, path: str | None) -> bool:
    try:
        return path is not None and block.get_submodule(path) is not None
    except AttributeError:
        return False


def block_steps(block: nn.Module, spec: ArchSpec) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """The block's true-sequential steps, each a tuple of groups whose inputs do not depend on
    each other's rounding: one group per step for dense blocks; a MoE block has the attention
    steps, then every expert's (gate, up) with the shared expert's, then every down."""
    moe = spec.moe
    if moe is None or not has_module(block, moe.experts):
        return tuple((g,) for g in spec.groups)
    experts = block.get_submodule(moe.experts)
    if not isinstance(experts, nn.ModuleList):
        raise LowbitError(f"{spec.family}: {moe.experts} holds fused experts; split them first "
                          "(lowbit.runtime.experts.unfuse_experts)")
    g, u, d = moe.proj
    heads = [f"{moe.experts}.{e}." for e in range(len(experts))]
    gate_up = [(p + g, p + u) for p in heads]
    down = [(p + d,) for p in heads]
    if has_module(block, moe.shared):
        s = f"{moe.shared}."
        gate_up.append((s + "gate_proj", s + "up_proj"))
        down.append((s + "down_proj",))
    return (*((grp,) for grp in spec.groups[:2]), tuple(gate_up), tuple(down))


def block_groups(block: nn.Module, spec: ArchSpec) -> tuple[tuple[str, ...], ...]:
    """The block's groups of Linears sharing an input, in true-sequential order."""
    return tuple(g for step in block_steps(block, spec) for g in step)


def expert_index(spec: ArchSpec, local: str) -> int | None:
    """The expert a block Linear belongs to (``mlp.experts.3.w1`` -> 3), None for the others."""
    if spec.moe is None or not local.startswith(spec.moe.experts + "."):
        return None
    return int(local[len(spec.moe.experts) + 1 :].split(".", 1)[0])


def checkpoint_name(spec: ArchSpec, name: str, reverse: bool = False) -> str:
    """A full module or tensor name as the family's transformers checkpoints spell it (with
    ``reverse``: a checkpoint's name as the module is named in memory)."""
    for mem, disk in spec.moe.renames if spec.moe else ():
        name = name.replace(disk, mem) if reverse else name.replace(mem, disk)
    return name


def spec_for_type(model_type: str | None) -> ArchSpec | None:
    """The table of a config's ``model_type``, None when no family has it."""
    return next((s for s in SPECS if model_type in s.model_types), None)
