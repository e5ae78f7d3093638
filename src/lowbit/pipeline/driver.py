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
) -> list[torch.Tensor]:
    """Quantize the model in place block by block. Returns the last block's outputs."""
    cap = capture_inputs(model, spec, windows, chunk)
    blocks = get_blocks(model, spec)
    n_tokens = windows.numel()
    bar = tqdm(total=len(blocks), desc="blocks", unit="block", disable=not progress)
    hidden = cap.hidden
    for bi, block in enumerate(blocks):
        if quantize_group is not None:
            linears = block_linears(block, spec)
            for group in spec.groups:
                tw = _token_weights(hidden, token_weight, group, spec)
                stats = _collect(block, spec, linears, group, hidden, cap.kwargs, hessian, bi, tw)
                t0 = time.perf_counter()
                rows = quantize_group(bi, {n: linears[n] for n in group}, stats)
                dt = (time.perf_counter() - t0) / len(group)
                for name in group:
                    w = get_weight(linears[name], spec)
                    row = {
                        "block": bi,
                        "name": f"{spec.blocks}.{bi}.{name}",
                        "shape": list(w.shape),
                        "tokens": n_tokens,
                        "seconds": round(dt, 3),
                    }
                    row.update(rows.get(name, {}))
                    if on_row:
                        on_row(row)
                del stats
        hidden = [_block_out(block(h, **kw)) for h, kw in zip(hidden, cap.kwargs, strict=True)]
        for h in hidden:
            if not torch.isfinite(h).all():
                raise LowbitError(f"non-finite activations after block {bi}")
        bar.update(1)
    bar.close()
    return hidden


TOKEN_WEIGHTS = ("none", "residual", "residual-out")


def _token_weights(hidden, mode: str, group, spec: ArchSpec) -> list[torch.Tensor] | None:
    """Per-token Hessian weights 1 / mean(h^2) of the block's residual input, normalised to
    mean 1: an error added to the residual stream reaches the next norm divided by the
    residual's RMS, so tokens with massive residuals (attention sinks) matter less per unit
    of absolute error. ``residual-out`` applies them only to Linears that write into the
    residual stream (the last of each sub-layer)."""
    if mode == "none":
        return None
    if mode not in TOKEN_WEIGHTS:
        raise LowbitError(f"unknown token weighting {mode!r}; known: {', '.join(TOKEN_WEIGHTS)}")
    if mode == "residual-out" and group not in (spec.groups[1], spec.groups[-1]):
        return None
    w = [1.0 / h.float().pow(2).mean(-1).clamp(min=1e-12) for h in hidden]
    mean = torch.cat([x.flatten() for x in w]).mean()
    return [x / mean for x in w]


def _collect(
    block, spec, linears, group, hidden, kwargs, hessian, bi, tw=None
) -> dict[str, InputStats]:
    """Run the chunks up to the group's (shared) input and gather statistics there."""
    first = linears[group[0]]
    st = InputStats(get_weight(first, spec).shape[1], hessian=hessian)

    current: list[torch.Tensor | None] = [None]

    def hook(_mod, args):
        try:
            st.add(args[0], current[0])
        except FloatingPointError as e:
            raise LowbitError(f"{e} at block {bi} {group[0]}") from None
        raise _Stop

    handle = first.register_forward_pre_hook(hook)
    try:
        for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
            current[0] = None if tw is None else tw[i]
            try:
                block(h, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return {name: st for name in group}
