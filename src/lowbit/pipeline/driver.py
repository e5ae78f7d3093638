"""The sequential block driver shared by every calibrated method.

Block 0's inputs (and the keyword arguments the model passes to its blocks) are captured
once. Then, block by block: for each true-sequential group of Linears, the calibration
chunks run through the block only as far as that group's input (the forward is stopped
there), statistics are collected, and the group is quantized; finally the block runs in full
with its quantized weights to make the next block's inputs. At most one block's
activations are held at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec, block_linears, get_blocks
from lowbit.errors import LowbitError
from lowbit.pipeline.observers import InputStats


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


# keyword arguments that carry state between calls: never replayed into a block
_STATEFUL = ("past_key_value", "past_key_values", "layer_past", "cache", "use_cache")


def _is_cache(v: object) -> bool:
    return type(v).__name__.endswith("Cache") or hasattr(v, "get_seq_length")


def clean_block_kwargs(kwargs: dict) -> dict:
    """Drop anything that accumulates between block calls (a KV cache above all)."""
    out = {}
    for k, v in kwargs.items():
        if k in _STATEFUL or _is_cache(v):
            continue
        out[k] = v
    if "use_cache" in kwargs:
        out["use_cache"] = False
    return out


@dataclass
class Captured:
    hidden: list[torch.Tensor]  # one (chunk, seq, hidden) tensor per chunk
    kwargs: list[dict]


@torch.no_grad()
def capture_inputs(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, chunk: int) -> Captured:
    """Run the model up to block 0 for each chunk of windows and keep what block 0 receives."""
    block0 = get_blocks(model, spec)[0]
    hidden: list[torch.Tensor] = []
    kw: list[dict] = []

    def hook(_mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h.detach())
        kw.append(clean_block_kwargs({k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, windows.shape[0], chunk):
            try:
                model(input_ids=windows[i : i + chunk], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return Captured(hidden, kw)


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


def get_weight(module: nn.Module, spec: ArchSpec) -> torch.Tensor:
    """A Linear's weight as (out, in), whatever the module stores."""
    return module.weight.data.T if spec.conv1d else module.weight.data


def set_weight(module: nn.Module, spec: ArchSpec, w: torch.Tensor) -> None:
    target = module.weight.data
    target.copy_((w.T if spec.conv1d else w).to(target.dtype))


# quantize_group(block_index, {name: module}, {name: stats}) -> per-name log dicts
GroupFn = Callable[[int, dict[str, nn.Module], dict[str, InputStats]], dict[str, dict]]


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    spec: ArchSpec,
    windows: torch.Tensor,
    quantize_group: GroupFn | None,
    chunk: int = 8,
    hessian: bool = True,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    token_weight: str = "none",
    resume: bool = True,
) -> list[torch.Tensor]:
    """Quantize the model in place block by block. Returns the last block's outputs.

    With ``resume`` (and a family whose table gives ``mlp_path``) each block runs about once:
    the attention's last Linear is quantized from captured inputs and its change added to the
    captured residual stream, the MLP then runs from the norm on that stream, and the block's
    output is the stream plus the quantized MLP output. Otherwise every group re-runs the
    block from its start (exact for any block structure, about 2.3 times the work).
    """
    cap = capture_inputs(model, spec, windows, chunk)
    blocks = get_blocks(model, spec)
    n_tokens = windows.numel()
    bar = tqdm(total=len(blocks), desc="blocks", unit="block", disable=not progress)
    hidden = cap.hidden
    for bi, block in enumerate(blocks):
        if quantize_group is None:
            hidden = _run_block(block, hidden, cap.kwargs)
        else:
            step = _Stepper(block, spec, bi, n_tokens, quantize_group, hessian, on_row)
            tw = _token_weights(hidden, token_weight, spec)
            if resume and spec.mlp_path is not None and len(spec.groups) == 4:
                hidden = _block_resumed(step, hidden, cap.kwargs, tw)
            else:
                for group in spec.groups:
                    step(group, _collect(step, group, hidden, cap.kwargs, tw))
                hidden = _run_block(block, hidden, cap.kwargs)
        for h in hidden:
            if not torch.isfinite(h).all():
                raise LowbitError(f"non-finite activations after block {bi}")
        bar.update(1)
    bar.close()
    return hidden


def _run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]):
    return [_block_out(block(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]


class _Stepper:
    """Quantizes one true-sequential group of a block from its statistics and logs a row per
    Linear."""

    def __init__(self, block, spec, bi, n_tokens, quantize_group, hessian, on_row) -> None:
        self.block, self.spec, self.bi = block, spec, bi
        self.linears = block_linears(block, spec)
        self.n_tokens, self.quantize_group = n_tokens, quantize_group
        self.hessian, self.on_row = hessian, on_row

    def stats(self, group) -> InputStats:
        return InputStats(get_weight(self.linears[group[0]], self.spec).shape[1], self.hessian)

    def add(self, st: InputStats, x: torch.Tensor, tw: torch.Tensor | None, group) -> None:
        try:
            st.add(x, tw)
        except FloatingPointError as e:
            raise LowbitError(f"{e} at block {self.bi} {group[0]}") from None

    def __call__(self, group, st: InputStats) -> None:
        t0 = time.perf_counter()
        rows = self.quantize_group(
            self.bi, {n: self.linears[n] for n in group}, {n: st for n in group}
        )
        dt = (time.perf_counter() - t0) / len(group)
        for name in group:
            w = get_weight(self.linears[name], self.spec)
            row = {
                "block": self.bi,
                "name": f"{self.spec.blocks}.{self.bi}.{name}",
                "shape": list(w.shape),
                "tokens": self.n_tokens,
                "seconds": round(dt, 3),
            }
            row.update(rows.get(name, {}))
            if self.on_row:
                self.on_row(row)


def _block_resumed(step: _Stepper, hidden, kwargs, tw) -> list[torch.Tensor]:
    """One block of the resumed schedule (see ``run_sequential``)."""
    spec, block, linears = step.spec, step.block, step.linears
    g_attn, g_attn_out, g_mlp, g_mlp_out = spec.groups
    norm = block.get_submodule(spec.mlp_path[0])
    mlp = block.get_submodule(spec.mlp_path[1])
    o_lin, down_lin = linears[g_attn_out[0]], linears[g_mlp_out[0]]
    chunks = range(len(hidden))

    step(g_attn, _collect(step, g_attn, hidden, kwargs, tw))

    # the attention's output Linear: its inputs, and the residual stream entering the norm
    st = step.stats(g_attn_out)
    a_in: list[torch.Tensor] = []
    stream: list[torch.Tensor] = []
    current = [0]

    def at_o(_mod, args):
        a_in.append(args[0])
        step.add(st, args[0], None if tw is None else tw[current[0]], g_attn_out)

    def at_norm(_mod, args):
        stream.append(args[0])
        raise _Stop

    handles = [o_lin.register_forward_pre_hook(at_o), norm.register_forward_pre_hook(at_norm)]
    try:
        for i in chunks:
            current[0] = i
            try:
                block(hidden[i], **kwargs[i])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    w_old = get_weight(o_lin, spec).clone()
    step(g_attn_out, st)
    delta = get_weight(o_lin, spec) - w_old
    stream = [s + a @ delta.T for s, a in zip(stream, a_in, strict=True)]
    a_in.clear()

    st = step.stats(g_mlp)
    for i in chunks:
        step.add(st, norm(stream[i]), None if tw is None else tw[i], g_mlp)
    step(g_mlp, st)

    st = step.stats(g_mlp_out)
    d_in: list[torch.Tensor] = []

    def at_down(_mod, args):
        d_in.append(args[0])
        step.add(st, args[0], None if tw is None else tw[current[0]], g_mlp_out)
        raise _Stop

    handle = down_lin.register_forward_pre_hook(at_down)
    try:
        for i in chunks:
            current[0] = i
            try:
                mlp(norm(stream[i]))
            except _Stop:
                pass
    finally:
        handle.remove()
    step(g_mlp_out, st)
    return [s + down_lin(d) for s, d in zip(stream, d_in, strict=True)]


TOKEN_WEIGHTS = ("none", "residual")


def _token_weights(hidden, mode: str, spec: ArchSpec) -> list[torch.Tensor] | None:
    """Per-token Hessian weights 1 / mean(h^2) of the block's residual input, normalised to
    mean 1: an error added to the residual stream reaches the next norm divided by the
    residual's RMS, so tokens with massive residuals (attention sinks) matter less per unit
    of absolute error (experimental; see BENCHMARKS.md)."""
    if mode == "none":
        return None
    if mode not in TOKEN_WEIGHTS:
        raise LowbitError(f"unknown token weighting {mode!r}; known: {', '.join(TOKEN_WEIGHTS)}")
    w = [1.0 / h.float().pow(2).mean(-1).clamp(min=1e-12) for h in hidden]
    mean = torch.cat([x.flatten() for x in w]).mean()
    return [x / mean for x in w]


def _collect(step: _Stepper, group, hidden, kwargs, tw=None) -> InputStats:
    """Run the chunks through the block up to the group's (shared) input; statistics there."""
    st = step.stats(group)
    current = [0]

    def hook(_mod, args):
        step.add(st, args[0], None if tw is None else tw[current[0]], group)
        raise _Stop

    handle = step.linears[group[0]].register_forward_pre_hook(hook)
    try:
        for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
            current[0] = i
            try:
                step.block(h, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return st
