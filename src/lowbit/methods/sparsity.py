"""Sparsity patterns and the choice of which weights to drop, as functions over tensors.

A pattern is a fraction of weights pruned (``0.5``: unstructured) or ``N:M``: N weights kept
in every M consecutive inputs of an output row (``2:4``, ``4:8``; NVIDIA's semi-structured
sparsity keeps 2 of 4). A keep mask is a bool tensor of the weight's shape, True where the
weight stays.

``select`` keeps the highest scores under a pattern, over the whole layer (magnitude pruning's
comparison group), per output row (Wanda's), or within each M-group (N:M).
``obs_scores`` is SparseGPT's: w^2 / [(H + lambda I)^-1]_jj^2, the loss of removing a weight
and letting the columns after it compensate, from the same Cholesky factor GPTQ uses
(``methods.gptq.Hessian.u``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError

_NM = re.compile(r"(\d+):(\d+)")


@dataclass(frozen=True)
class Sparsity:
    """``ratio``: the fraction of weights pruned; ``n``/``m`` for N:M (n kept of every m)."""

    ratio: float
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | float) -> Sparsity:
        s = str(text).strip()
        if m := _NM.fullmatch(s):
            n, mm = int(m.group(1)), int(m.group(2))
            if not 0 < n < mm or mm > 64:
                raise LowbitError(f"sparsity {s!r}: N:M keeps N of every M inputs, 0 < N < M "
                                  "<= 64 (2:4, 4:8)")
            return cls(1 - n / mm, n, mm)
        try:
            r = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            raise LowbitError(f"sparsity {s!r}: give the fraction pruned (0.5, 50%) or N:M "
                              "(2:4, 4:8)") from None
        if not 0 < r < 1:
            raise LowbitError(f"sparsity {s!r}: the fraction pruned must lie in (0, 1)")
        return cls(r)

    @property
    def nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.nm else f"{self.ratio:g}"

    def check(self, in_features: int) -> None:
        if self.nm and in_features % self.m:
            raise LowbitError(f"{self}: {in_features} inputs are not a multiple of {self.m}")


def select(scores: Tensor, sp: Sparsity, per_row: bool = False) -> Tensor:
    """Keep mask with the highest ``scores`` (out, in) kept under ``sp``: N:M within each
    group of M inputs of a row; a fraction over the whole tensor, or over each row."""
    rows, cols = scores.shape
    if sp.nm:
        sp.check(cols)
        g = scores.reshape(rows, cols // sp.m, sp.m)
        idx = g.topk(sp.n, dim=-1).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.reshape(rows, cols)
    if per_row:
        k = round(cols * sp.ratio)  # pruned per row
        idx = scores.topk(k, dim=1, largest=False).indices
        return torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, False)
    k = round(scores.numel() * sp.ratio)
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().topk(k, largest=False).indices] = False
    return keep.reshape(rows, cols)


def obs_scores(w: Tensor, u_diag: Tensor) -> Tensor:
    """SparseGPT's saliency of each weight of a column block: w^2 / d^2, ``d`` the diagonal of
    the upper Cholesky factor of the damped inverse Hessian over those columns."""
    return w.square() / u_diag.square()

