"""SmoothQuant (Xiao et al.): migrate activation outliers into the weights before W8A8.

A transform step: on each block, the max |x| of every Linear input is observed, and for every
group of Linears fed by a norm the scales ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` are
folded into the norm (x / s) and the group's input columns (W s): the full-precision model
computes the same function, with flatter activations. The statistics it observed are kept
(``act_stats.safetensors`` in a native output folder; ``lowbit inspect --stats`` reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.arch import get_weight
from lowbit.errors import LowbitError
from lowbit.methods.base import Transform, register
from lowbit.methods.fold import apply_scales, norm_feeds

OBSERVED = frozenset({"absmax", "mean_abs", "token_absmax"})


def smooth_scales(xmax: Tensor, wmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1-alpha); channels that never fire (or
    have no weight) keep s = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"alpha must be in [0, 1], not {alpha}")
    x, w = xmax.double(), wmax.double()
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    ok = (x > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=1e-5), torch.ones_like(s)).float()


@register
@dataclass(frozen=True)
class SmoothQuant(Transform):
    """Smoothing of every norm -> Linears group with at least one quantized Linear."""

    step = "smoothquant"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise LowbitError(f"smoothquant: alpha must be in [0, 1], not {self.alpha}")

    @torch.no_grad()
    def transform(self, ctx, plan) -> list[dict]:
        groups = [f for f in norm_feeds(ctx.spec)
                  if any(self.applies(ctx.full(n)) and ctx.full(n) in plan.layers
                         for n in f.group)]
        stats, _ = ctx.observe(list(ctx.linears), OBSERVED)
        ctx.kept |= {ctx.full(n): st for n, st in stats.items()}
        rows = []
        for feed in groups:
            wmax = torch.stack([get_weight(ctx.block.get_submodule(n), ctx.spec).abs().amax(0)
                                for n in feed.group]).amax(0)
            s = smooth_scales(stats[feed.group[0]].absmax, wmax, self.alpha)
            apply_scales(ctx.block, ctx.spec, feed, s)
            rows.append({"group": list(feed.group), "feeder": feed.source,
                         "scale_max": float(s.max()), "scale_min": float(s.min())})
        return rows
