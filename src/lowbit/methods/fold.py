"""Per-input-channel scales folded so the full-precision model computes the same function.

A group of Linears sharing an input ``x`` computes ``W x``; with a positive scale vector s,
``W x = (W diag(s)) (x / s)``. The division by s is folded into whatever produces x: the
preceding norm's weight (and bias), or the output rows of the preceding Linear (v -> o,
up -> down). Which module feeds which comes from the architecture tables in ``lowbit.arch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.arch import ArchSpec, get_weight, set_weight
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Feed:
    """``group`` (Linears sharing an input) is fed by ``source``: a norm or a Linear."""

    source: str
    kind: str  # "norm" or "linear"
    group: tuple[str, ...]


def feeds(spec: ArchSpec, groups: tuple[tuple[str, ...], ...] | None = None) -> list[Feed]:
    """The feeder of every group (default: all of the spec's groups), or a LowbitError naming
    the group whose mapping the table lacks."""
    out = []
    for group in groups if groups is not None else spec.groups:
        found = [Feed(n, "norm", group) for n, g in spec.norm_feeds.items() if tuple(g) == group]
        found += [
            Feed(n, "linear", group) for n, g in spec.linear_feeds.items() if tuple(g) == group
        ]
        if not found:
            raise LowbitError(
                f"{spec.family}: no norm or Linear feeding {', '.join(group)} in the architecture "
                "table (norm_feeds / linear_feeds in lowbit/arch.py); its input scales cannot "
                "be folded"
            )
        out.append(found[0])
    return out


def norm_feeds(spec: ArchSpec) -> list[Feed]:
    """Only the norm -> Linears mappings (what SmoothQuant smooths)."""
    if not spec.norm_feeds:
        raise LowbitError(f"{spec.family}: the architecture table has no norm_feeds mapping")
    return [Feed(n, "norm", tuple(g)) for n, g in spec.norm_feeds.items()]


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """norm(x) / s: the norm multiplies by ``offset + weight`` (and adds a bias if any)."""
    w = norm.weight.data
    if w.shape != s.shape:
        raise LowbitError(f"norm weight {tuple(w.shape)} does not match scales {tuple(s.shape)}")
    w.copy_(((offset + w.double()) / s.double() - offset).to(w.dtype))
    b = getattr(norm, "bias", None)
    if b is not None:
        b.data.copy_((b.data.double() / s.double()).to(b.dtype))


@torch.no_grad()
def fold_into_linear(lin: nn.Module, s: torch.Tensor, spec: ArchSpec) -> None:
    """Divide the Linear's output rows (and bias) by s."""
    w = get_weight(lin, spec)
    if w.shape[0] != s.shape[0]:
        raise LowbitError(f"Linear with {w.shape[0]} outputs cannot take {s.shape[0]} scales")
    set_weight(lin, spec, (w.double() / s.double()[:, None]).float())
    if getattr(lin, "bias", None) is not None:
        lin.bias.data.copy_((lin.bias.data.double() / s.double()).to(lin.bias.dtype))


@torch.no_grad()
def scale_columns(lin: nn.Module, s: torch.Tensor, spec: ArchSpec) -> None:
    """Multiply the Linear's input columns by s."""
    w = get_weight(lin, spec)
    set_weight(lin, spec, (w.double() * s.double()[None, :]).float())


def kv_layout(cfg) -> tuple[int, int, int] | None:
    """(heads, kv heads, head dim) when the attention shares value heads (GQA), else None;
    ``cfg`` is the model's config."""
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if not heads or kv == heads:
        return None
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, hd


def kv_reduce(x: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """Per-channel statistic over o_proj's inputs (heads * hd) -> per value channel
    (kv * hd), averaging the query heads that share a value head."""
    heads, kv, hd = layout
    return x.reshape(kv, heads // kv, hd).mean(1).reshape(kv * hd)


def kv_expand(s: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    heads, kv, hd = layout
    return s.reshape(kv, 1, hd).expand(kv, heads // kv, hd).reshape(heads * hd)


def apply_scales(
    block: nn.Module, spec: ArchSpec, feed: Feed, s: torch.Tensor,
    layout: tuple[int, int, int] | None = None,
) -> None:
    """Fold ``1/s`` into the feeder and ``s`` into the group's input columns. For a Linear
    feeder with fewer outputs than the group's inputs (GQA v -> o), ``s`` is per value
    channel and expanded over the query heads sharing it."""
    src = block.get_submodule(feed.source)
    s_in = s
    if feed.kind == "norm":
        fold_into_norm(src, s, spec.norm_offset)
    else:
        fold_into_linear(src, s, spec)
        n_in = get_weight(block.get_submodule(feed.group[0]), spec).shape[1]
        if n_in != s.shape[0]:
            if layout is None:
                raise LowbitError(f"{feed.source} feeds {feed.group[0]} with a different width")
            s_in = kv_expand(s, layout)
    for name in feed.group:
        scale_columns(block.get_submodule(name), s_in, spec)
