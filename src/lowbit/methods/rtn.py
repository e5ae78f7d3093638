"""Round-to-nearest: every weight to its nearest grid point, with the grid's own parameters."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import WeightGrid, check_finite, grouped_args
from lowbit.formats.weight import GridWeight
from lowbit.methods.base import Rounder, register


def rtn(w: Tensor, grid: WeightGrid, sensitivity: Tensor | None = None) -> GridWeight:
    """Round an (out, in) weight onto ``grid``.

    ``sensitivity`` ((in,) or (out, in), e.g. the Hessian diagonal) weights SqueezeLLM's k-means
    and the integer grids' MSE clipping search.
    """
    check_finite(w)
    wf = w.detach().float()
    grid.check(*wf.shape)
    if sensitivity is not None and tuple(sensitivity.shape) not in ((wf.shape[1],), wf.shape):
        raise LowbitError(f"sensitivity of shape {tuple(sensitivity.shape)} for a weight of "
                          f"shape {tuple(wf.shape)}: give ({wf.shape[1]},) or the weight's shape")
    ctx = grid.prepare(wf, sensitivity)
    params = grid.finalize(grid.fit_all(wf, sensitivity, ctx))
    xv, pv = grouped_args(grid, wf, params)
    codes = grid.encode(xv, pv).reshape(wf.shape)
    sat = grid.saturated(xv, pv).reshape(wf.shape).sum(1)
    return GridWeight(grid, codes, params, saturated=sat)


LOSS_BLOCK = 1 << 22  # weights per row block of ``grid_loss``: 16 MB of fp32 temporaries


def hessian_loss(delta: Tensor, h: Tensor) -> float:
    """Mean over output rows of dW H dW^T: the layer-output error GPTQ minimises."""
    return float(((delta @ h) * delta).sum() / delta.shape[0])


def grid_loss(gw: GridWeight, w: Tensor, h: Tensor) -> float:
    """``hessian_loss(gw.dequantize() - w, h)`` decoded a row block at a time, so the
    temporaries stay a few MB whatever the weight's size (grids whose parameters span rows
    decode whole)."""
    total, rows = 0.0, gw.shape[0]
    for r0, r1 in gw.row_blocks(LOSS_BLOCK):
        delta = (gw if (r0, r1) == (0, rows) else gw.rows(r0, r1)).dequantize()
        delta -= w[r0:r1]
        total += float(((delta @ h) * delta).sum())
    return total / rows


@register
@dataclass(frozen=True)
class RTN(Rounder):
    """Round-to-nearest onto each layer's grid; calibration only for grids that need the
    Hessian diagonal (SqueezeLLM)."""

    row_separable: ClassVar[bool] = True
    keeps_zeros: ClassVar[bool] = True  # rounds pruned Linears (methods.prune)

    step = "rtn"

    def round_layers(self, weights: dict, grids: dict, stats, sparse: dict | None = None) -> dict:
        """``sparse``: name -> keep mask of a pruned Linear (its zeros stay zeros; the step
        refuses a grid on which zero does not round to zero)."""
        out = {}
        for name, w in weights.items():
            t0 = time.perf_counter()
            grid = grids[name]
            sens = torch.diag(stats.h) if grid.needs_sensitivity else None
            gw = rtn(w, grid, sens)
            keep = (sparse or {}).get(name)
            if keep is not None and bool((gw.dequantize()[~keep] != 0).any()):
                raise LowbitError(f"{grid.name} cannot store a pruned weight: zero is not on "
                                  "its grid (choose a grid with an exact zero)")
            out[name] = (gw, {"saturated": gw.n_saturated,
                              "seconds": round(time.perf_counter() - t0, 3)})
        return out
