"""Block-wise learned rounding (the AutoRound family): per decoder block, a rounding offset
``v`` in [-0.5, 0.5] steps for every weight is learned so that the block with its weights
rounded as ``round(w / s + v)`` reproduces the block's full-precision outputs; then the
offsets are frozen onto the grid. The grid's parameters (scales, zero points) are the RTN
fit's, so the stored format is unchanged: only which of its two neighbouring levels each
weight takes is learned.

Per block (``round_block``, called by the driver's plan when the block starts): the targets
are the block's outputs at its float weights on the block's inputs (the quantized model's
stream, so each block also corrects what the blocks before it lost); every step takes
``batch`` windows, runs the block with every target Linear's weight fake-quantized
(``methods.fakequant``: the grid's own round trip, straight-through gradients), and moves the
offsets by Adam (step ``lr``, by default ``1 / iters``: AutoRound's rule, so the offsets can
cross their whole range once) on the mean squared error, normalised by the targets' mean
square. The
straight-through steps overshoot once many weights flip together, so the loss over the first
``check_windows`` windows is measured at the start (plain RTN) and ``evals`` times during
training, and the best state is kept (AutoRound keeps its best iterate the same way): the
result is never worse than RTN on those windows.

Grids: integer ones (``w4g64``, ``w3g64-asym``...), where an offset is a fraction of the group's
step, and any grid of at most 16 levels (``nf4``, ``fp4-g32``, ``mxfp4``, ``nvfp4``), where it
is a fraction of the gap between the two levels around the weight
(``methods.fakequant.level_gaps``): either way an offset of +-0.5 reaches the neighbouring level.
The output layer, outside every block, is rounded to nearest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.func import functional_call

from lowbit.arch import get_weight
from lowbit.errors import LowbitError
from lowbit.formats.grid_base import WeightGrid, column_params, grouped_args
from lowbit.formats.integer import IntGrid
from lowbit.formats.weight import GridWeight
from lowbit.methods.base import Rounder, register
from lowbit.methods.fakequant import clamp_offsets, fake_quant, level_gaps
from lowbit.methods.rtn import RTN
from lowbit.pipeline.dist import world


def _rows_of(value, rows: slice, n: int):
    """``value`` (a block's keyword arguments) with every tensor whose first axis is the
    chunk's ``n`` windows cut to ``rows`` (masks, per-window positions; shared ones stay)."""
    if isinstance(value, Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _rows_of(v, rows, n) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_rows_of(v, rows, n) for v in value)
    return value


@register
@dataclass(frozen=True)
class AutoRound(Rounder):
    """Block-wise learned rounding offsets (see the module docstring)."""

    block_wise: ClassVar[bool] = True

    step = "autoround"
    iters: int = 200
    lr: float | None = None  # Adam's step; default 1/iters (AutoRound's rule for its lr)
    batch: int = 2  # windows per step
    evals: int = 8  # loss measurements during training (the best state is kept)
    check_windows: int = 16  # windows those measurements run on (the first ones)
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("iters", 1), ("batch", 1), ("evals", 1), ("check_windows", 1)):
            if getattr(self, name) < low:
                raise LowbitError(f"autoround: {name} must be at least {low}, "
                                  f"not {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise LowbitError(f"autoround: lr must be positive, not {self.lr}")

    def check_grid(self, grid: WeightGrid) -> None:
        if grid.needs_sensitivity:
            raise LowbitError(f"autoround: {grid.name} is fitted from the Hessian (SqueezeLLM); "
                              "use --method gptq or rtn with calibration")
        if not isinstance(grid, IntGrid) and grid.code_bits > 4:
            raise LowbitError(f"autoround: {grid.name} has {1 << grid.code_bits} levels; learned "
                              "rounding takes integer grids and grids of at most 16 levels "
                              "(nf4, fp4, mxfp4, nvfp4)")

    def wants(self, grid: WeightGrid) -> frozenset[str]:
        return frozenset()

    def needs_data(self) -> bool:
        return True

    def round_layers(self, weights: dict, grids: dict, stats) -> dict:
        """Linears outside the blocks (the output layer): round to nearest."""
        return RTN(scheme=self.scheme).round_layers(weights, grids, stats)

    def round_block(self, ctx, layers: dict[str, str], grids: dict[str, WeightGrid]) -> dict:
        """Learn the offsets of the block's Linears ``layers`` (full name -> name in the block)
        onto ``grids`` (by full name); returns full name -> (GridWeight, info row)."""
        if world()[1] > 1:
            raise LowbitError("autoround learns on every calibration window in one process; "
                              "run it without --nproc")
        t0 = time.perf_counter()
        spec, block = ctx.spec, ctx.block
        w0, params, steps, offsets, dtypes = {}, {}, {}, {}, {}
        for full, local in layers.items():
            grid = grids[full]
            w = get_weight(ctx.linears[local], spec).detach()
            dtypes[full], w = w.dtype, w.float()
            p = grid.finalize(grid.fit_all(w, None, grid.prepare(w)))
            w0[full], params[full] = w, p
            if isinstance(grid, IntGrid):  # one step a weight: its group's scale
                cols = torch.arange(w.shape[1]) // (grid.group_size or w.shape[1])
                steps[full] = column_params(grid, p, cols)["scale"].expand_as(w)
            else:  # the gap between the levels around it (NF4, FP4, MX: uneven)
                steps[full] = level_gaps(grid, w, p)
            offsets[full] = torch.zeros_like(w, requires_grad=True)
        hidden, kwargs = ctx.main.hidden, ctx.main.kwargs
        targets = ctx.run()
        norm = [float(t.float().pow(2).mean()) or 1.0 for t in targets]
        names = {full: f"{local}.weight" for full, local in layers.items()}

        def weights(detached: bool = False) -> dict[str, Tensor]:
            out = {}
            for full, name in names.items():
                v = offsets[full].detach() if detached else offsets[full]
                wq = fake_quant(w0[full] + v * steps[full], grids[full], params[full])
                wq = wq.to(dtypes[full])  # the block computes in the model's dtype
                out[name] = wq.T if spec.conv1d else wq
            return out

        def run(chunk: int, rows: slice | None = None, detached: bool = False) -> Tensor:
            h, kw = hidden[chunk], kwargs[chunk]
            if rows is not None:
                kw = _rows_of(kw, rows, h.shape[0])
                h = h[rows]
            out = functional_call(block, weights(detached), (h,), kw)
            out = out[0] if isinstance(out, tuple) else out
            t = targets[chunk] if rows is None else targets[chunk][rows]
            return (out.float() - t.float()).pow(2).mean() / norm[chunk]

        checks, left = [], self.check_windows  # (chunk, rows) of the first windows
        for c, h in enumerate(hidden):
            if left <= 0:
                break
            checks.append((c, slice(0, min(left, h.shape[0]))))
            left -= h.shape[0]

        @torch.no_grad()
        def full_loss() -> float:
            return sum(float(run(c, rows, detached=True)) for c, rows in checks) / len(checks)

        picks = [(c, slice(r, min(r + self.batch, h.shape[0])))
                 for c, h in enumerate(hidden) for r in range(0, h.shape[0], self.batch)]
        order = torch.randperm(len(picks), generator=torch.Generator().manual_seed(self.seed))
        opt = torch.optim.Adam(list(offsets.values()), lr=self.lr or 1.0 / self.iters)
        start = best = full_loss()
        kept = {f: v.detach().clone() for f, v in offsets.items()}
        every = max(1, self.iters // self.evals)
        for it in range(self.iters):
            c, rows = picks[int(order[it % len(picks)])]
            opt.zero_grad()
            with torch.enable_grad():
                loss = run(c, rows)
                loss.backward()
            opt.step()
            for v in offsets.values():
                clamp_offsets(v)
            if (it + 1) % every == 0 or it + 1 == self.iters:
                now = full_loss()
                if now < best:
                    best = now
                    kept = {f: v.detach().clone() for f, v in offsets.items()}
        secs = round((time.perf_counter() - t0) / len(layers), 3)
        out = {}
        for full in layers:
            grid, p = grids[full], params[full]
            shifted = w0[full] + kept[full] * steps[full]
            xv, pv = grouped_args(grid, shifted, p)
            codes = grid.encode(xv, pv).reshape(shifted.shape)
            sat = grid.saturated(xv, pv).reshape(shifted.shape).sum(1)
            nearest = grid.encode(*grouped_args(grid, w0[full], p)).reshape(shifted.shape)
            flipped = float((codes != nearest).float().mean())
            out[full] = (GridWeight(grid, codes, p, saturated=sat),
                         {"block_loss_rtn": start, "block_loss": best, "iters": self.iters,
                          "codes_changed": round(flipped, 4), "seconds": secs,
                          "saturated": int(sat.sum())})
        return out
