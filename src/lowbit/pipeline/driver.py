"""The sequential block driver shared by every calibrated step.

Block 0's inputs and the keyword arguments the model passes to its blocks (per kind of block
when the config gives ``layer_types``: Gemma 2/3's sliding and global layers get other masks
and RoPE) are captured once for the calibration windows (the *main* stream) and, when a step
asks for one, for a small *sample* of them (AWQ's search). Then, block by block, a visitor
(``lowbit.pipeline.plan``) is called in four phases:

1. ``transform(ctx)`` - on the block as it is, with its inputs (AWQ, SmoothQuant);
2. for each true-sequential group of Linears (a group shares one input): its statistics are
   collected where the visitor wants them and ``round(ctx, group, stats)`` quantizes it;
3. ``replace(ctx)`` - runtime modules swapped in (W8A8 ...);
4. the block's outputs become the next block's inputs, then ``finish(ctx)``.

Mixture-of-experts blocks (``ArchSpec.moe``; their fused experts are first split into one
Linear per expert, ``lowbit.runtime.experts``) run in steps of several groups (``block_steps``):
one pass over the block collects every expert's (gate, up) input statistics from the tokens
routed to it, the next every down's. An expert whose own tokens are fewer than
``moe_min_tokens`` times its input size is topped up to that many with the statistics of the
expert run on every token reaching the block (``stats.blend``); the rows say so per expert.

At most one block's activations are held at a time. Families whose table gives ``mlp_path``
use the resumed schedule (each block runs about once, see ``run_sequential``); the others re-run
the block up to each group's input, which is exact for any block structure and about 2.3 times
the work: a note says so.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.arch import (
    ArchSpec,
    block_linears,
    block_steps,
    expert_index,
    get_blocks,
    get_weight,
    text_config,
)
from lowbit.errors import LowbitError
from lowbit.formats.grid_base import all_finite
from lowbit.pipeline.dist import sync_stats
from lowbit.pipeline.stats import InputStats, blend
from lowbit.runtime.experts import unfuse_experts

# an expert's own input statistics are used alone from this many routed tokens per input
# channel: below the input size its Hessian is singular, and near it very noisy
MOE_MIN_TOKENS = 2.0
HESSIAN_BYTES = 2 << 30  # Hessians collected in one pass of a MoE step, at most


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


# keyword arguments that carry state between calls: never replayed into a block
_STATEFUL = ("past_key_value", "past_key_values", "layer_past", "cache", "use_cache")


def _is_cache(v: object) -> bool:
    return type(v).__name__.endswith("Cache") or hasattr(v, "get_seq_length")


def clean_block_kwargs(kwargs: dict) -> dict:
    """Drop anything that accumulates between block calls (a KV cache above all)."""
    out = {k: v for k, v in kwargs.items() if k not in _STATEFUL and not _is_cache(v)}
    if "use_cache" in kwargs:
        out["use_cache"] = False
    return out


@dataclass
class Stream:
    """Inputs of the current block: one (chunk, seq, hidden) tensor per chunk of windows, and
    the keyword arguments the model passes to it."""

    hidden: list[Tensor]
    kwargs: list[dict]
    # models whose config gives ``layer_types`` pass each kind of block its own keyword
    # arguments (gemma2/3: a sliding-window mask; gemma3: the local RoPE): per kind, with the
    # kind of every block
    by_type: dict[str, list[dict]] = field(default_factory=dict)
    layer_types: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def enter(self, block: int) -> None:
        """Take the keyword arguments of block ``block``."""
        if self.by_type:
            self.kwargs = self.by_type[self.layer_types[block]]


@torch.no_grad()
def capture_inputs(model: nn.Module, spec: ArchSpec, windows: Tensor, chunk: int) -> Stream:
    """Run the model up to block 0 for each chunk of windows and keep what block 0 receives;
    when the blocks are of several kinds (``layer_types``), run on to the first block of each
    kind and keep its keyword arguments too."""
    blocks = get_blocks(model, spec)
    kinds = tuple(getattr(text_config(model), "layer_types", None) or ())[: len(blocks)]
    if len(set(kinds)) < 2 or len(kinds) != len(blocks):
        kinds = ()
    first = {k: kinds.index(k) for k in dict.fromkeys(kinds)} or {"": 0}
    last = max(first.values())
    hidden: list[Tensor] = []
    kw: dict[str, list[dict]] = {k: [] for k in first}

    def hook_for(kind: str, index: int):
        def hook(_mod, args, kwargs):
            if index == 0:
                h = args[0] if args else kwargs["hidden_states"]
                hidden.append(h.detach())
            kw[kind].append(clean_block_kwargs(
                {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if index == last:
                raise _Stop
        return hook

    handles = [blocks[i].register_forward_pre_hook(hook_for(k, i), with_kwargs=True)
               for k, i in first.items()]
    try:
        for i in range(0, windows.shape[0], chunk):
            try:
                model(input_ids=windows[i : i + chunk], use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if not kinds:
        return Stream(hidden, kw[""])
    return Stream(hidden, kw[kinds[0]], kw, kinds)


def block_output(out):
    """A block's hidden states from whatever it returns."""
    return out[0] if isinstance(out, tuple) else out


class BlockContext:
    """One block while the driver visits it: its Linears, its input streams, and helpers that
    run it (whole, or with hooks that observe Linear inputs)."""

    def __init__(self, index: int, block: nn.Module, spec: ArchSpec, main: Stream,
                 sample: Stream | None, config=None) -> None:
        self.index, self.block, self.spec, self.config = index, block, spec, config
        self.main, self.sample = main, sample
        self.linears = block_linears(block, spec)
        self.kept: dict[str, InputStats] = {}  # statistics a step keeps (by full name)

    def full(self, name: str) -> str:
        """The full module name of a Linear of this block."""
        return f"{self.spec.blocks}.{self.index}.{name}"

    def in_features(self, name: str) -> int:
        return get_weight(self.linears[name], self.spec).shape[1]

    @torch.no_grad()
    def run(self, stream: Stream | None = None) -> list[Tensor]:
        """The block's outputs for every chunk of a stream (default: main)."""
        s = stream or self.main
        return [block_output(self.block(h, **kw)) for h, kw in zip(s.hidden, s.kwargs, strict=True)]

    @torch.no_grad()
    def observe(self, names, want: frozenset[str] = frozenset(), stream: Stream | None = None,
                keep_inputs: bool = False) -> tuple[dict[str, InputStats], dict[str, list[Tensor]]]:
        """Run the block over a stream with hooks on the named Linears: statistics of their
        inputs (and the inputs themselves when ``keep_inputs``)."""
        stats = {n: InputStats(self.in_features(n), want) for n in names}
        kept: dict[str, list[Tensor]] = {n: [] for n in names}

        def hook_for(n):
            def hook(_mod, args):
                x = args[0]
                try:
                    stats[n].add(x)
                except FloatingPointError:
                    raise LowbitError(f"non-finite activations at the input of "
                                      f"{self.full(n)}") from None
                if keep_inputs:
                    kept[n].append(x.detach().reshape(-1, x.shape[-1]))
            return hook

        handles = [self.linears[n].register_forward_pre_hook(hook_for(n)) for n in names]
        try:
            self.run(stream)
        finally:
            for h in handles:
                h.remove()
        if stream is None or stream is self.main:  # each rank holds a share of the main stream
            for st in stats.values():
                sync_stats(st)
        return stats, kept


class BlockVisitor(Protocol):
    def transform(self, ctx: BlockContext) -> None: ...

    def wants(self, ctx: BlockContext, group: tuple[str, ...]) -> frozenset[str] | None:
        """Statistics the group's rounding needs, or None when the group is not rounded."""

    def round(self, ctx: BlockContext, group: tuple[str, ...], stats: InputStats) -> None: ...

    def replace(self, ctx: BlockContext) -> bool:
        """Swap in runtime modules; True when anything was replaced."""

    def finish(self, ctx: BlockContext) -> None: ...


def note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    spec: ArchSpec,
    windows: Tensor,
    visitor: BlockVisitor,
    chunk: int = 8,
    progress: bool = True,
    sample: Tensor | None = None,
    resume: bool = True,
    moe_min_tokens: float = MOE_MIN_TOKENS,
    start: int = 0,
    inputs: tuple[list[Tensor] | None, list[Tensor] | None] = (None, None),
    on_block: Callable[[BlockContext, Stream, Stream | None, list[str]], None] | None = None,
    sources: list[str] | None = None,
) -> Stream:
    """Visit every block in order (see the module docstring). Returns the last block's outputs.

    With ``resume`` (and a family whose table gives ``mlp_path``) each block runs about once:
    the attention's last Linear is rounded from captured inputs and its change added to the
    captured residual stream, the MLP then runs from the norm on that stream, and the block's
    output is the stream plus the rounded MLP output. Otherwise every group re-runs the block
    from its start.

    A resumed run (``lowbit.pipeline.checkpoint``) gives ``start``, the first unfinished block,
    with its stored ``inputs`` (main, sample) and the expert-statistics ``sources`` so far; the
    blocks before it are already quantized. ``on_block`` is called when a block is finished
    (after ``visitor.finish``), with the next block's inputs.
    """
    if windows.dim() != 2 or windows.numel() == 0:
        raise LowbitError(f"calibration windows must be a non-empty (n, seq_len) tensor of token "
                          f"ids, not of shape {tuple(windows.shape)}")
    unfuse_experts(model)
    main = capture_inputs(model, spec, windows, chunk)
    samp = None if sample is None else capture_inputs(model, spec, sample, chunk)
    if start:
        main.hidden = inputs[0]
        if samp is not None:
            samp.hidden = inputs[1]
    blocks = get_blocks(model, spec)
    resumable = resume and spec.mlp_path is not None and len(spec.groups) == 4
    announced = False
    # per rounded expert group: where its statistics came from
    sources = [] if sources is None else sources
    bar = tqdm(total=len(blocks), initial=start, desc="blocks", unit="block",
               disable=not progress)
    for bi, block in enumerate(blocks):
        if bi < start:
            continue
        for stream in (main, samp):
            if stream is not None:
                stream.enter(bi)
        ctx = BlockContext(bi, block, spec, main, samp, text_config(model))
        visitor.transform(ctx)
        steps = block_steps(block, spec)
        moe = any(len(st) > 1 for st in steps)
        wants = [] if moe else [visitor.wants(ctx, g) for g in spec.groups]
        nxt = None
        if moe:
            _block_moe(ctx, visitor, steps, moe_min_tokens, sources)
        elif any(w is not None for w in wants):
            if resumable:
                nxt = _block_resumed(ctx, visitor, wants)
            else:
                if resume and not announced:
                    note(f"{spec.family} blocks are re-run up to each group of Linears (about "
                         "2.3x the work of the resumed schedule, which needs an mlp_path in "
                         "lowbit/arch.py)")
                    announced = True
                for g, want in zip(spec.groups, wants, strict=True):
                    if want is not None:
                        visitor.round(ctx, g, _collect(ctx, g, want))
        if visitor.replace(ctx) or nxt is None:
            nxt = ctx.run(main)
        for h in nxt:
            if not all_finite(h):
                raise LowbitError(f"non-finite activations after block {bi}")
        main.hidden = nxt
        visitor.finish(ctx)
        if samp is not None:
            samp.hidden = ctx.run(samp)
        if on_block is not None:
            on_block(ctx, main, samp, sources)
        bar.update(1)
    bar.close()
    few = len(sources) - sources.count("own")
    if few:
        note(f"{few} of {len(sources)} expert groups were routed fewer calibration tokens than "
             f"{moe_min_tokens:g} x their input size; their statistics were topped up with the "
             "expert's on every token reaching its block (rows: hessian blend / pooled)")
    return main


def _add(ctx: BlockContext, st: InputStats, x: Tensor, group) -> None:
    try:
        st.add(x)
    except FloatingPointError as e:
        raise LowbitError(f"{e} at block {ctx.index} {group[0]}") from None


def _stats(ctx: BlockContext, group, want) -> InputStats:
    return InputStats(ctx.in_features(group[0]), want or frozenset())


def _collect(ctx: BlockContext, group, want) -> InputStats:
    """Run the chunks through the block up to the group's (shared) input; statistics there."""
    st = _stats(ctx, group, want)

    def hook(_mod, args):
        _add(ctx, st, args[0], group)
        raise _Stop

    handle = ctx.linears[group[0]].register_forward_pre_hook(hook)
    try:
        for h, kw in zip(ctx.main.hidden, ctx.main.kwargs, strict=True):
            try:
                ctx.block(h, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return sync_stats(st)


def _block_moe(ctx: BlockContext, visitor: BlockVisitor, steps, min_tokens: float,
               sources: list[str]) -> None:
    """A block in steps of groups with independent inputs (see the module docstring)."""
    for step in steps:
        wants = {g: w for g in step if (w := visitor.wants(ctx, g)) is not None}
        if len(step) == 1:
            for g, want in wants.items():
                visitor.round(ctx, g, _collect(ctx, g, want))
            continue
        for part in _parts(ctx, wants):
            stats, xs = _collect_many(ctx, part)
            for g, st in stats.items():
                e = expert_index(ctx.spec, g[0])
                if e is not None:
                    st = _expert_stats(ctx, g, e, st, xs, min_tokens)
                    sources.append(st.info.get("hessian", "own"))
                visitor.round(ctx, g, st)


def _parts(ctx: BlockContext, wants: dict) -> list[dict]:
    """The groups of a step in passes whose Hessians fit in ``HESSIAN_BYTES`` together."""
    parts: list[dict] = [{}]
    size = 0
    for g, want in wants.items():
        b = 4 * ctx.in_features(g[0]) ** 2 if "hessian" in want else 0
        if parts[-1] and size + b > HESSIAN_BYTES:
            parts.append({})
            size = 0
        parts[-1][g] = want
        size += b
    return parts


def _collect_many(ctx: BlockContext, wants: dict) -> tuple[dict, list[Tensor]]:
    """One pass over the block: the statistics at every group's input (an expert's: of the
    tokens routed to it) and the inputs of the MoE router (every token reaching the experts)."""
    stats = {g: _stats(ctx, g, w) for g, w in wants.items()}
    xs: list[Tensor] = []

    def hook_for(g):
        return lambda _mod, args: _add(ctx, stats[g], args[0], g)

    def at_router(_mod, args):
        xs.append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [ctx.linears[g[0]].register_forward_pre_hook(hook_for(g)) for g in stats]
    handles.append(ctx.block.get_submodule(ctx.spec.moe.router).register_forward_pre_hook(at_router))
    try:
        ctx.run()
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        sync_stats(st)
    return stats, xs


def _expert_stats(ctx: BlockContext, group, e: int, own: InputStats, xs: list[Tensor],
                  min_tokens: float) -> InputStats:
    """An expert group's statistics: its own, or topped up with those of the expert run on
    every token of ``xs`` when it was routed fewer than ``min_tokens`` x in_features."""
    need = math.ceil(min_tokens * ctx.in_features(group[0]))
    info = {"expert": e, "tokens": own.n}
    if own.n >= need or not own.want:
        own.info = info | ({"hessian": "own"} if own.want else {})
        return own
    prior = InputStats(own.absmax.numel(), own.want)
    expert = ctx.block.get_submodule(group[0].rpartition(".")[0])
    handle = ctx.linears[group[0]].register_forward_pre_hook(
        lambda _mod, args: _add(ctx, prior, args[0], group))
    try:
        for x in xs:
            expert(x)
    finally:
        handle.remove()
    st = blend(own, sync_stats(prior), need)
    st.info = info | {"hessian": "blend" if own.n else "pooled",
                      "prior_share": round(1 - own.n / need, 4)}
    return st


def _block_resumed(ctx: BlockContext, visitor: BlockVisitor, wants) -> list[Tensor]:
    """One block of the resumed schedule (see ``run_sequential``)."""
    spec, block, linears = ctx.spec, ctx.block, ctx.linears
    hidden, kwargs = ctx.main.hidden, ctx.main.kwargs
    g_attn, g_attn_out, g_mlp, g_mlp_out = spec.groups
    w_attn, w_attn_out, w_mlp, w_mlp_out = wants
    norm = block.get_submodule(spec.mlp_path[0])
    mlp = block.get_submodule(spec.mlp_path[1])
    o_lin, down_lin = linears[g_attn_out[0]], linears[g_mlp_out[0]]
    chunks = range(len(hidden))

    def step(group, want, st):
        if want is not None:
            visitor.round(ctx, group, st)

    if w_attn is not None:
        step(g_attn, w_attn, _collect(ctx, g_attn, w_attn))

    # the attention's output Linear: its inputs, and the residual stream entering the norm
    st = _stats(ctx, g_attn_out, w_attn_out)
    a_in: list[Tensor] = []
    stream: list[Tensor] = []

    def at_o(_mod, args):
        a_in.append(args[0])
        _add(ctx, st, args[0], g_attn_out)

    def at_norm(_mod, args):
        stream.append(args[0])
        raise _Stop

    handles = [o_lin.register_forward_pre_hook(at_o), norm.register_forward_pre_hook(at_norm)]
    try:
        for i in chunks:
            try:
                block(hidden[i], **kwargs[i])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    w_old = get_weight(o_lin, spec).clone()
    step(g_attn_out, w_attn_out, sync_stats(st))
    delta = get_weight(o_lin, spec) - w_old
    stream = [s + a @ delta.T for s, a in zip(stream, a_in, strict=True)]
    a_in.clear()

    st = _stats(ctx, g_mlp, w_mlp)
    for i in chunks:
        _add(ctx, st, norm(stream[i]), g_mlp)
    step(g_mlp, w_mlp, sync_stats(st))

    st = _stats(ctx, g_mlp_out, w_mlp_out)
    d_in: list[Tensor] = []

    def at_down(_mod, args):
        d_in.append(args[0])
        _add(ctx, st, args[0], g_mlp_out)
        raise _Stop

    handle = down_lin.register_forward_pre_hook(at_down)
    try:
        for i in chunks:
            try:
                mlp(norm(stream[i]))
            except _Stop:
                pass
    finally:
        handle.remove()
    step(g_mlp_out, w_mlp_out, sync_stats(st))
    return [s + down_lin(d) for s, d in zip(stream, d_in, strict=True)]


class _Observer:
    """A visitor that changes nothing and keeps the statistics of every group's input."""

    def __init__(self, want: frozenset[str]) -> None:
        self.want = want
        self.stats: dict[str, InputStats] = {}

    def transform(self, ctx: BlockContext) -> None:
        pass

    def wants(self, ctx: BlockContext, group) -> frozenset[str]:
        return self.want

    def round(self, ctx: BlockContext, group, stats: InputStats) -> None:
        for n in group:
            self.stats[ctx.full(n)] = stats

    def replace(self, ctx: BlockContext) -> bool:
        return False

    def finish(self, ctx: BlockContext) -> None:
        pass


def observe_model(model: nn.Module, spec: ArchSpec, windows: Tensor,
                  want: frozenset[str] | set[str], chunk: int = 8,
                  progress: bool = True) -> dict[str, InputStats]:
    """Statistics of every block Linear's input (Linears sharing an input share one object),
    from one pass of the driver that leaves the weights unchanged."""
    obs = _Observer(frozenset(want))
    run_sequential(model, spec, windows, obs, chunk=chunk, progress=progress)
    return obs.stats
