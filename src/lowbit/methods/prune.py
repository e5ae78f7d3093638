"""Pruning: magnitude, Wanda (Sun et al., 2023) and SparseGPT (Frantar & Alistarh, 2023), at a
fraction of weights or N:M, as a ``pruner`` step that runs on each Linear just before its
rounder (or alone: ``--method none`` keeps the pruned weights in full precision).

- ``magnitude``: drop the smallest |w| of the layer (N:M: of each group of M inputs).
- ``wanda``: score |w| * ||x_j|| (the input channel's norm over the calibration tokens), the
  comparison group each output row (N:M: each group of M), no weight update.
- ``owl`` (with a fraction): OWL's non-uniform sparsity (Yin et al., 2023). A first pass over
  the calibration windows measures, per decoder block, the share of its weights whose Wanda
  score exceeds ``owl_m`` times the block's mean score (its outliers); blocks with more
  outliers are pruned less, the ratios spread linearly over ``sparsity +- owl_lambda`` with the
  mean kept at ``sparsity``.
- ``sparsegpt``: the OBS sweep GPTQ uses, with the rounding replaced by dropping: the columns
  are visited in order and the error of each dropped weight is pushed onto the columns not yet
  visited through the Cholesky factor of (H + lambda I)^-1; which weights go is chosen as the
  sweep reaches them, by w^2 / [H^-1]_jj^2, over each block of 128 columns (N:M: each group of
  M). Followed by ``gptq``, the two run as one sweep (the SparseGPT paper's joint 50% + 4-bit):
  each kept weight is rounded and each dropped one zeroed, and both errors are fed back.

The weights a pruner drops stay zero through the rounder after it (``rtn`` and ``gptq`` take a
keep mask; a grid without an exact zero is refused). Sequential like every step: a block's
Linears are pruned on inputs that come from the blocks already pruned (and rounded).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import check_finite
from lowbit.methods.base import Step, register
from lowbit.methods.gptq import Hessian, prepare_hessian
from lowbit.methods.rtn import hessian_loss
from lowbit.methods.sparsity import Sparsity, obs_scores, select

PRUNERS = ("magnitude", "wanda", "sparsegpt")


def magnitude(w: Tensor, sp: Sparsity) -> Tensor:
    """Keep mask of magnitude pruning: the layer's largest |w| (N:M: per group)."""
    return select(w.detach().float().abs(), sp)


def wanda(w: Tensor, sq_norm: Tensor, sp: Sparsity) -> Tensor:
    """Keep mask of Wanda: |w_ij| * ||x_j||, compared within each output row (N:M: per
    group). ``sq_norm`` (in,): any positive multiple of each input channel's sum of squares
    (the Hessian's diagonal will do: the order within a row does not change)."""
    return select(w.detach().float().abs() * sq_norm.clamp_min(0).sqrt(), sp, per_row=True)


def sparsegpt(w: Tensor, hes: Hessian, sp: Sparsity, block_size: int = 128) -> tuple[Tensor,
                                                                                      Tensor]:
    """(pruned and updated weight, keep mask) of SparseGPT on an (out, in) weight, given its
    input Hessian prepared without act-order."""
    check_finite(w)
    if hes.perm is not None:
        raise LowbitError("sparsegpt visits the columns in order: prepare H without act-order")
    W = w.detach().float().clone()
    rows, cols = W.shape
    sp.check(cols)
    if sp.nm and block_size % sp.m:
        raise LowbitError(f"sparsegpt: block_size {block_size} is not a multiple of {sp.m}")
    W[:, hes.dead] = 0
    U = hes.u
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1, K1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2], keep[:, i1:i2]
        d = U1.diagonal()
        if not sp.nm:
            K1.copy_(select(obs_scores(W1, d), sp))
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if sp.nm and i % sp.m == 0:
                K1[:, i : i + sp.m] = select(obs_scores(W1[:, i : i + sp.m], d[i : i + sp.m]),
                                             sp)
            x = W1[:, i]
            err = torch.where(K1[:, i], 0.0, x) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            W1[:, i].masked_fill_(~K1[:, i], 0.0)  # exactly zero, not x - x
            err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].addmm_(err1, U[i1:i2, i2:], alpha=-1)
    return W, keep


@register
@dataclass(frozen=True)
class Prune(Step):
    """Drop a ``sparsity`` of each target Linear's weights by ``method`` (magnitude, wanda,
    sparsegpt): ``"0.5"`` (unstructured) or ``"2:4"``/``"4:8"`` (N kept of every M inputs)."""

    step = "prune"
    kind: ClassVar[str] = "pruner"
    method: str = "wanda"
    sparsity: str = "0.5"
    damp: float = 0.01  # sparsegpt: of the mean Hessian diagonal, as GPTQ
    block_size: int = 128  # sparsegpt: columns per lazy-update block and mask choice
    owl: bool = False  # per-block ratios from the blocks' outlier shares (OWL)
    owl_m: float = 5.0  # an outlier's score: this many times the block's mean (OWL's M)
    owl_lambda: float = 0.08  # the ratios' spread around the mean (OWL's lambda)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in PRUNERS:
            raise LowbitError(f"prune: unknown method {self.method!r}; known: "
                              f"{', '.join(PRUNERS)}")
        object.__setattr__(self, "sparsity", str(self.sparsity))
        self.pattern  # noqa: B018 - parsed now: a bad pattern is refused before any run
        if not 0 <= self.damp < 1:
            raise LowbitError(f"prune: damp must lie in [0, 1), not {self.damp}")
        if self.block_size < 1:
            raise LowbitError(f"prune: block_size must be positive, not {self.block_size}")
        if self.owl and self.pattern.nm:
            raise LowbitError(f"prune: owl varies the fraction per block; {self.sparsity} "
                              "keeps N of every M everywhere")
        room = min(self.pattern.ratio, 1 - self.pattern.ratio)
        if self.owl and not 0 < self.owl_lambda < room:
            raise LowbitError(f"prune: owl_lambda must keep every block's ratio inside (0, 1): "
                              f"0 < {self.owl_lambda} < {room:g}")

    @property
    def pattern(self) -> Sparsity:
        return Sparsity.parse(self.sparsity)

    def check_shape(self, rows: int, cols: int) -> None:
        self.pattern.check(cols)

    def wants(self) -> frozenset[str]:
        return frozenset({"magnitude": (), "wanda": ("sq_sum",),
                          "sparsegpt": ("hessian",)}[self.method])

    def needs_data(self) -> bool:
        return bool(self.wants()) or self.owl

    def prepare(self, model, plan, calib, progress: bool = True) -> list[dict]:
        """OWL's pass before the first block: each block's ratio from its outlier share."""
        if not self.owl:
            return []
        from lowbit.pipeline.driver import observe_model

        mine = [f for f, p in plan.pruned.items() if p is self]
        stats = observe_model(model, plan.spec, calib, {"sq_sum"}, progress=progress)
        shares: dict[int, list[float]] = {}
        for bi in sorted({_block_of(f) for f in mine}):
            scores = torch.cat([
                (model.get_submodule(f).weight.detach().float().abs()
                 * stats[f].sq_sum.float().sqrt()).flatten()
                for f in mine if _block_of(f) == bi])
            shares[bi] = [float((scores > self.owl_m * scores.mean()).float().mean())]
        d = torch.tensor([v[0] for v in shares.values()], dtype=torch.float64)
        spread = d - d.min()
        spread = spread / spread.max() * 2 * self.owl_lambda if spread.max() > 0 else spread
        ratios = self.pattern.ratio - (spread - spread.mean())
        object.__setattr__(self, "_ratios", dict(zip(shares, ratios.tolist(), strict=True)))
        return [{"block": bi, "outlier_share": round(shares[bi][0], 5),
                 "sparsity": round(self._ratios[bi], 4)} for bi in shares]

    def pattern_for(self, name: str) -> Sparsity:
        """The pattern of one layer: the step's, or its block's OWL ratio."""
        if not self.owl:
            return self.pattern
        return Sparsity(self._ratios[_block_of(name)])

    def joint_with(self, rounder) -> bool:
        """Whether pruning happens inside ``rounder``'s own sweep (sparsegpt + gptq)."""
        return self.method == "sparsegpt" and getattr(rounder, "step", None) == "gptq"

    def prune_layers(self, weights: dict[str, Tensor], stats) -> dict[str, tuple]:
        """name -> (pruned weight, keep mask, info row) for Linears sharing one input."""
        out = {}
        hes = None
        for name, w in weights.items():
            t0 = time.perf_counter()
            sp = self.pattern_for(name)
            sp.check(w.shape[1])
            if self.method != "sparsegpt":
                keep = magnitude(w, sp) if self.method == "magnitude" else \
                    wanda(w, stats.sq_sum, sp)
                new = w.detach().float() * keep
            else:
                if hes is None:
                    hes = prepare_hessian(stats.h, act_order=False, damp=self.damp)
                new, keep = sparsegpt(w, hes, sp, self.block_size)
            info = {"pruner": self.method + ("+owl" if self.owl else ""), "sparsity": str(sp),
                    "pruned": round(1 - float(keep.float().mean()), 4),
                    "prune_seconds": round(time.perf_counter() - t0, 3)}
            if stats is not None and stats.h is not None:
                info["prune_loss"] = hessian_loss(new - w.detach().float(), stats.h.float())
            out[name] = (new, keep, info)
        return out


def _block_of(name: str) -> int:
    """The decoder block a Linear's full name lies in (its first numeric part)."""
    m = re.search(r"\.(\d+)\.", name)
    if m is None:
        raise LowbitError(f"prune: {name} is not inside a decoder block")
    return int(m.group(1))
