"""AWQ (Lin et al.): activation-aware per-input-channel scaling, then weight clipping.

A transform step, run on each block before its rounding: for every group of Linears sharing an
input, scales ``s = mean|x|^alpha`` (normalised so max * min = 1) are tried for ``alpha`` on a
grid; the group's weights are replaced by ``Q(W diag(s)) diag(s)^-1`` - Q rounding to nearest
onto each Linear's own grid (the one the recipe's rounder will use) - and the mean squared
error of the *block's output* against the unscaled block, on a small sample of the calibration
windows, decides. The best scales are folded (``lowbit.methods.fold``): the full-precision
model computes the same function. Then, per rounded Linear except the query and key
projections, the range of each (output row, group) is shrunk by the ratio that minimises the
Linear's output error on sampled inputs. The rounder that follows does the rounding.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.arch import get_weight, set_weight
from lowbit.errors import LowbitError
from lowbit.formats.grid_base import WeightGrid
from lowbit.methods.base import Transform, register
from lowbit.methods.fold import Feed, apply_scales, feeds, kv_expand, kv_layout, kv_reduce
from lowbit.methods.rtn import rtn
from lowbit.pipeline.stats import MIN_TOKENS

NO_CLIP = ("q_proj", "k_proj")  # AWQ leaves these unclipped (errors there pass the softmax)


def fake_quant(w: Tensor, grid: WeightGrid) -> Tensor:
    return rtn(w, grid).dequantize()


def awq_scales(mean_abs: Tensor, alpha: float) -> Tensor:
    """s = mean|x|^alpha, normalised so that max(s) * min(s) = 1."""
    s = mean_abs.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def clip_search(
    w: Tensor, x: Tensor, grid: WeightGrid, n_ratios: int = 10, shrink: float = 0.5
) -> tuple[Tensor, dict]:
    """The weight clipped per (row, group) to the range ratio in 1.0 down to ``1 - shrink``
    (``n_ratios`` steps) that minimises ||(Q(W_clipped) - W) x||^2 over the sampled inputs x
    (tokens, in). Returns the clipped weight and the mean ratio chosen."""
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = grid.group_size or in_f
    if in_f % gs:
        gs = in_f  # blocks that do not tile the row (FP8 128x128 edges): clip whole rows
    ng = in_f // gs
    wg = w.reshape(out_f, ng, gs)
    xg = x.float().reshape(-1, ng, gs)
    if grid.symmetric:
        hi0 = wg.abs().amax(-1, keepdim=True)
        lo0 = -hi0
    else:
        hi0 = wg.amax(-1, keepdim=True)
        lo0 = wg.amin(-1, keepdim=True)
    best_err = torch.full((out_f, ng), float("inf"))
    best = torch.ones(out_f, ng)
    for r in [1.0 - shrink * i / n_ratios for i in range(n_ratios)]:
        wc = torch.maximum(torch.minimum(wg, hi0 * r), lo0 * r)
        dq = fake_quant(wc.reshape(out_f, in_f), grid).reshape(out_f, ng, gs)
        err = torch.einsum("ogk,tgk->otg", dq - wg, xg).pow(2).sum(1)  # (out, groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    b = best[..., None]
    clipped = torch.maximum(torch.minimum(wg, hi0 * b), lo0 * b).reshape(out_f, in_f)
    return clipped, {"clip_mean": float(best.mean()), "clip_frac": float((best < 1).float().mean())}


def _block_loss(out: list[Tensor], target: list[Tensor]) -> float:
    return sum(float((o - t).pow(2).mean()) for o, t in zip(out, target, strict=True)) / len(out)


@torch.no_grad()
def search_feed(ctx, feed: Feed, grids: dict[str, WeightGrid], mean_abs: Tensor, layout,
                target: list[Tensor], n_grid: int) -> tuple[Tensor, dict]:
    """Best scales for one group, by the block-output error on the sample stream."""
    spec = ctx.spec
    lins = {n: ctx.block.get_submodule(n) for n in feed.group}
    orig = {n: get_weight(m, spec).clone() for n, m in lins.items()}
    gqa = feed.kind == "linear" and layout is not None and (
        get_weight(ctx.block.get_submodule(feed.source), spec).shape[0] != mean_abs.shape[0]
    )
    m = kv_reduce(mean_abs, layout) if gqa else mean_abs
    losses = []
    best, best_loss = None, float("inf")
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = awq_scales(m, alpha)
            s_in = kv_expand(s, layout) if gqa else s
            for n, mod in lins.items():
                if n in grids:
                    w = orig[n] * s_in[None, :]
                    set_weight(mod, spec, fake_quant(w, grids[n]) / s_in[None, :])
            loss = _block_loss(ctx.run(ctx.sample), target)
            losses.append(loss)
            if loss < best_loss:
                best, best_loss = (alpha, s), loss
    finally:
        for n, mod in lins.items():
            set_weight(mod, spec, orig[n])
    alpha, s = best
    return s, {"alpha": alpha, "block_loss": best_loss, "block_loss_alpha0": losses[0]}


@register
@dataclass(frozen=True)
class AWQ(Transform):
    """AWQ scales and clipping for the groups of Linears whose layers a rounder quantizes.

    ``search_windows`` windows spread over the calibration set (cut to their first
    ``search_tokens`` tokens if given) make the search's loss; ``clip_tokens`` inputs sampled
    from them make the clipping's."""

    step = "awq"
    n_grid: int = 20
    search_windows: int = 4
    search_tokens: int | None = None
    clip: bool = True
    clip_tokens: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 2:
            raise LowbitError(f"awq: the alpha grid needs at least 2 points, not {self.n_grid}")
        if self.search_windows < 1 or self.clip_tokens < 1:
            raise LowbitError("awq: search_windows and clip_tokens must be positive")
        if self.search_tokens is not None and self.search_tokens < 2:
            raise LowbitError(f"awq: search_tokens must be at least 2, not {self.search_tokens}")

    def sample(self, windows: Tensor) -> Tensor:
        if windows.numel() < MIN_TOKENS:
            warnings.warn(f"only {windows.numel()} calibration tokens; AWQ's channel statistics "
                          f"need about {MIN_TOKENS} or more to be stable", stacklevel=2)
        n_s = max(1, min(self.search_windows, windows.shape[0]))
        pick = torch.linspace(0, windows.shape[0] - 1, n_s).round().long()
        return windows[pick][:, : self.search_tokens]

    @torch.no_grad()
    def transform(self, ctx, plan) -> list[dict]:
        t0 = time.perf_counter()
        grid_of = plan.grid_of
        fd = [f for f in feeds(ctx.spec) if any(
            self.applies(ctx.full(n)) and grid_of(ctx.full(n)) for n in f.group)]
        layout = kv_layout(ctx.config)
        stats, _ = ctx.observe([f.group[0] for f in fd], frozenset({"mean_abs"}))
        target = ctx.run(ctx.sample)
        rows: list[dict] = []
        for feed in fd:
            grids = {n: g for n in feed.group if (g := grid_of(ctx.full(n))) is not None}
            s, info = search_feed(ctx, feed, grids, stats[feed.group[0]].mean_abs, layout,
                                  target, self.n_grid)
            apply_scales(ctx.block, ctx.spec, feed, s, layout)
            rows.append({"group": list(feed.group), "feeder": feed.source} | info)
        if self.clip:
            names = [n for n in ctx.spec.linears if not n.endswith(NO_CLIP)
                     and self.applies(ctx.full(n)) and grid_of(ctx.full(n)) is not None]
            _, xs = ctx.observe(names, stream=ctx.sample, keep_inputs=True)
            for n in names:
                x = torch.cat(xs[n])
                step = max(1, x.shape[0] // self.clip_tokens)
                mod = ctx.linears[n]
                w_new, info = clip_search(get_weight(mod, ctx.spec), x[::step][: self.clip_tokens],
                                          grid_of(ctx.full(n)))
                set_weight(mod, ctx.spec, w_new)
                rows.append({"name": ctx.full(n)} | info)
        rows.append({"seconds": round(time.perf_counter() - t0, 2)})
        return rows
