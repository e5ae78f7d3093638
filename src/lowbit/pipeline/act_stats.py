"""Activation statistics of every decoder-block Linear's input, from one pass of the
calibration windows through the (full-precision) model: per-input-channel absmax and mean |x|,
and per-token absmax. Saved as safetensors next to an output and reusable by later runs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec, block_linears, get_blocks
from lowbit.errors import LowbitError

MIN_TOKENS = 4096  # below this, per-channel maxima and means are noisy: warn


@dataclass
class ActStats:
    absmax: torch.Tensor  # (in,) max |x| per input channel
    abs_sum: torch.Tensor  # (in,) float64 sum |x| per channel
    token_absmax: torch.Tensor  # (tokens,) max |x| over channels, per token
    n: int = 0

    @classmethod
    def empty(cls, in_features: int) -> ActStats:
        return cls(torch.zeros(in_features), torch.zeros(in_features, dtype=torch.float64),
                   torch.zeros(0), 0)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite values in the calibration activations")
        a = x.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(0))
        self.abs_sum += a.sum(0, dtype=torch.float64)
        self.token_absmax = torch.cat([self.token_absmax, a.amax(1)])
        self.n += x.shape[0]


class _Stop(Exception):
    pass


@torch.no_grad()
def collect_act_stats(
    model: nn.Module,
    spec: ArchSpec,
    windows: torch.Tensor,
    chunk: int = 8,
    progress: bool = True,
) -> dict[str, ActStats]:
    """Statistics of every block Linear's input, by full module name."""
    n_tok = windows.numel()
    if n_tok < MIN_TOKENS:
        warnings.warn(
            f"only {n_tok} calibration tokens; activation statistics need about {MIN_TOKENS} "
            "or more to be stable", stacklevel=2,
        )
    blocks = get_blocks(model, spec)
    stats: dict[str, ActStats] = {}
    handles = []

    def make_hook(full: str):
        def hook(_mod, args):
            try:
                stats[full].add(args[0])
            except FloatingPointError:
                raise LowbitError(f"non-finite activations at the input of {full}") from None
        return hook

    for bi, block in enumerate(blocks):
        for name, mod in block_linears(block, spec).items():
            full = f"{spec.blocks}.{bi}.{name}"
            w = mod.weight
            stats[full] = ActStats.empty(w.shape[0] if spec.conv1d else w.shape[1])
            handles.append(mod.register_forward_pre_hook(make_hook(full)))

    def stop(_m, _a, _o):
        raise _Stop

    handles.append(blocks[len(blocks) - 1].register_forward_hook(stop))
    try:
        for i in tqdm(range(0, windows.shape[0], chunk), desc="activation stats",
                      disable=not progress, leave=False):
            try:
                model(input_ids=windows[i : i + chunk], use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


def save_act_stats(path: Path, stats: dict[str, ActStats]) -> None:
    tensors = {}
    for name, st in stats.items():
        tensors[f"{name}.absmax"] = st.absmax.contiguous()
        tensors[f"{name}.abs_sum"] = st.abs_sum.contiguous()
        tensors[f"{name}.token_absmax"] = st.token_absmax.contiguous()
        tensors[f"{name}.n"] = torch.tensor([st.n], dtype=torch.int64)
    save_file(tensors, str(path), metadata={"format": "lowbit-act-stats"})


def load_act_stats(path: Path) -> dict[str, ActStats]:
    try:
        t = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise LowbitError(f"{path}: unreadable activation statistics ({e})") from None
    names = {k.rsplit(".", 1)[0] for k in t}
    return {
        n: ActStats(t[f"{n}.absmax"], t[f"{n}.abs_sum"], t[f"{n}.token_absmax"],
                    int(t[f"{n}.n"][0]))
        for n in names
    }


def outlier_profile(
    stats: dict[str, ActStats], spec: ArchSpec, ratio: float = 20.0
) -> list[dict]:
    """Per block and shared input: the channels whose absmax is ``ratio`` times the median
    channel's or more, and which Linears they feed."""
    rows = []
    for full, st in stats.items():
        prefix, rest = full[len(spec.blocks) + 1 :].split(".", 1)
        group = next((g for g in spec.groups if rest in g), (rest,))
        if rest != group[0]:
            continue  # one row per shared input
        med = float(st.absmax.median().clamp(min=1e-12))
        idx = torch.nonzero(st.absmax >= ratio * med).flatten()
        top = sorted(idx.tolist(), key=lambda j: -float(st.absmax[j]))
        rows.append({
            "block": int(prefix),
            "feeds": list(group),
            "channels": len(top),
            "top": top[:8],
            "max_ratio": float(st.absmax.max()) / med,
            "median_absmax": med,
        })
    return rows
