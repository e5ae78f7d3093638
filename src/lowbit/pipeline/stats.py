"""Statistics of a Linear's inputs, collected during calibration (observe, never apply).

One collector serves every consumer: GPTQ and SqueezeLLM (the Hessian H = 2 X^T X / n),
AWQ (mean |x| per channel), SmoothQuant and static activation scales (max |x| per channel),
``lowbit inspect`` (all of them, plus max |x| per token), the importance matrix (diag H / 2).
Saved as safetensors (``act_stats.safetensors``) and reusable.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import FINITE_CHUNK

MIN_TOKENS = 4096  # below this, per-channel maxima and means are noisy: steps warn
WANTS = frozenset({"hessian", "absmax", "mean_abs", "token_absmax", "sq_sum"})


class InputStats:
    """Running statistics of one input: token count ``n``, per-channel ``absmax`` and sum of
    |x| (always; cheap), the Hessian ``h`` (a float32 running mean; with ``"hessian"``), the
    per-channel sum of x^2 (with ``"sq_sum"``: Wanda's input norms without the Hessian) and the
    per-token max |x| (with ``"token_absmax"``)."""

    def __init__(self, in_features: int, want: frozenset[str] | set[str] = frozenset()) -> None:
        bad = set(want) - WANTS
        if bad:
            raise ValueError(f"unknown statistics {sorted(bad)}; known: {sorted(WANTS)}")
        self.want = frozenset(want)
        self.n = 0
        self.h: Tensor | None = torch.zeros(in_features, in_features) if "hessian" in want else None
        self.absmax = torch.zeros(in_features)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.token_absmax: Tensor | None = torch.zeros(0) if "token_absmax" in want else None
        self.sq_sum: Tensor | None = torch.zeros(in_features, dtype=torch.float64) \
            if "sq_sum" in want else None
        self.info: dict = {}  # extra fields for the rows of the Linears rounded from these

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs (..., in), a bounded number of tokens at a time (the fp32 copy
        and |x| of a whole batch of 8192-wide inputs would be twice its size again)."""
        x = x.detach().reshape(-1, x.shape[-1])
        for part in x.split(max(1, FINITE_CHUNK // x.shape[-1])):
            self._add(part.float())

    def _add(self, x: Tensor) -> None:
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite values in the calibration activations")
        b = x.shape[0]
        total = self.n + b
        if self.h is not None:
            self.h.mul_(self.n / total).addmm_(x.T, x, alpha=2.0 / total)
        a = x.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(0))
        self.abs_sum += a.sum(0, dtype=torch.float64)
        if self.sq_sum is not None:
            self.sq_sum += x.square().sum(0, dtype=torch.float64)
        if self.token_absmax is not None:
            self.token_absmax = torch.cat([self.token_absmax, a.amax(1)])
        self.n = total

    @property
    def mean_abs(self) -> Tensor:
        return (self.abs_sum / max(self.n, 1)).float()


def blend(own: InputStats, prior: InputStats, tokens: int) -> InputStats:
    """``own`` topped up to ``tokens`` effective tokens with ``prior``'s running means: the
    Hessian and mean |x| are ``(n H_own + (tokens - n) H_prior) / tokens`` (``own`` itself
    when it has that many tokens; ``prior``'s when it has none)."""
    if own.n >= tokens:
        return own
    w_own = own.n / tokens
    out = InputStats(own.absmax.numel(), own.want - {"token_absmax"})
    if out.h is not None:
        out.h = w_own * own.h + (1 - w_own) * prior.h
    out.n = tokens
    out.absmax = torch.maximum(own.absmax, prior.absmax)
    out.abs_sum = (w_own * own.mean_abs.double() + (1 - w_own) * prior.mean_abs.double()) * tokens
    if out.sq_sum is not None:
        out.sq_sum = (w_own * own.sq_sum / max(own.n, 1)
                      + (1 - w_own) * prior.sq_sum / max(prior.n, 1)) * tokens
    return out


def stats_tensors(stats: dict[str, InputStats]) -> dict[str, Tensor]:
    """Per-input statistics by Linear name as tensors (no Hessians: they are large and cheap
    to redo). Linears that share an input share one object in memory; each gets its own copy."""
    tensors = {}
    for name, st in stats.items():
        tensors[f"{name}.absmax"] = st.absmax.clone()
        tensors[f"{name}.abs_sum"] = st.abs_sum.clone()
        if st.token_absmax is not None:
            tensors[f"{name}.token_absmax"] = st.token_absmax.clone()
        if st.sq_sum is not None:
            tensors[f"{name}.sq_sum"] = st.sq_sum.clone()
        tensors[f"{name}.n"] = torch.tensor([st.n], dtype=torch.int64)
    return tensors


def stats_from_tensors(t: dict[str, Tensor]) -> dict[str, InputStats]:
    """Inverse of ``stats_tensors``; KeyError naming a missing tensor."""
    out = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in t}):
        st = InputStats(t[f"{name}.absmax"].numel())
        st.absmax, st.abs_sum = t[f"{name}.absmax"], t[f"{name}.abs_sum"]
        st.token_absmax = t.get(f"{name}.token_absmax")
        st.sq_sum = t.get(f"{name}.sq_sum")
        st.n = int(t[f"{name}.n"][0])
        out[name] = st
    return out


def save_stats(path: Path, stats: dict[str, InputStats]) -> None:
    save_file(stats_tensors(stats), str(path), metadata={"format": "lowbit-act-stats"})


def load_stats(path: Path) -> dict[str, InputStats]:
    try:
        t = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise LowbitError(f"{path}: unreadable activation statistics ({e})") from None
    try:
        return stats_from_tensors(t)
    except KeyError as e:
        raise LowbitError(f"{path}: activation statistics lack {e}") from None


def outlier_profile(stats: dict[str, InputStats], blocks_path: str,
                    groups: tuple[tuple[str, ...], ...], ratio: float = 20.0) -> list[dict]:
    """Per block and shared input: the channels whose absmax is ``ratio`` times the median
    channel's or more, and which Linears they feed."""
    rows = []
    for full, st in stats.items():
        if not full.startswith(blocks_path + "."):
            continue
        prefix, rest = full[len(blocks_path) + 1 :].split(".", 1)
        group = next((g for g in groups if rest in g), (rest,))
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
