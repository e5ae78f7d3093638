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

At most one block's activations are held at a time. Families whose table gives ``mlp_path``
use the resumed schedule (each block runs about once, see ``run_sequential``); the others re-run
the block up to each group's input, which is exact for any block structure and about 2.3 times
the work: a note says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec, block_linears, get_blocks, get_weight, text_config
from lowbit.errors import LowbitError
from lowbit.pipeline.stats import InputStats


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


def _block_out(out):
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
        return [_block_out(self.block(h, **kw)) for h, kw in zip(s.hidden, s.kwargs, strict=True)]

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
) -> Stream:
    """Visit every block in order (see the module docstring). Returns the last block's outputs.

    With ``resume`` (and a family whose table gives ``mlp_path``) each block runs about once:
    the attention's last Linear is rounded from captured inputs and its change added to the
    captured residual stream, the MLP then runs from the norm on that stream, and the block's
    output is the stream plus the rounded MLP output. Otherwise every group re-runs the block
    from its start.
    """
    if windows.dim() != 2 or windows.numel() == 0:
        raise LowbitError(f"calibration windows must be a non-empty (n, seq_len) tensor of token "
                          f"ids, not of shape {tuple(windows.shape)}")
    main = capture_inputs(model, spec, windows, chunk)
    samp = None if sample is None else capture_inputs(model, spec, sample, chunk)
    blocks = get_blocks(model, spec)
    resumable = resume and spec.mlp_path is not None and len(spec.groups) == 4
    announced = False
    bar = tqdm(total=len(blocks), desc="blocks", unit="block", disable=not progress)
    for bi, block in enumerate(blocks):
        for stream in (main, samp):
            if stream is not None:
                stream.enter(bi)
        ctx = BlockContext(bi, block, spec, main, samp, text_config(model))
        visitor.transform(ctx)
        wants = [visitor.wants(ctx, g) for g in spec.groups]
        nxt = None
        if any(w is not None for w in wants):
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
            if not torch.isfinite(h).all():
                raise LowbitError(f"non-finite activations after block {bi}")
        main.hidden = nxt
        visitor.finish(ctx)
        if samp is not None:
            samp.hidden = ctx.run(samp)
        bar.update(1)
    bar.close()
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
    step(g_attn_out, w_attn_out, st)
    delta = get_weight(o_lin, spec) - w_old
    stream = [s + a @ delta.T for s, a in zip(stream, a_in, strict=True)]
    a_in.clear()

    st = _stats(ctx, g_mlp, w_mlp)
    for i in chunks:
        _add(ctx, st, norm(stream[i]), g_mlp)
    step(g_mlp, w_mlp, st)

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
    step(g_mlp_out, w_mlp_out, st)
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
