"""HQQ (Badri & Shaji, 2023): half-quadratic quantization, a calibration-free rounder.

Each group's scale and zero point are optimised against the weight alone (no calibration
data): the error is measured with an l_p norm (p < 1) that tolerates a few large errors, and
minimised by half-quadratic splitting (``lowbit.methods.hqq_math``). The result is an ordinary
integer grid (``w4g64-asym`` ...: fp16 scales, integer zero points), so every export that takes
the integer scheme takes an HQQ model. As a step, HQQ is round-to-nearest with HQQ's
parameters; ``HqqGrid`` gives the same fitting to any rounder (GPTQ included).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import Params, WeightGrid, check_finite
from lowbit.formats.integer import IntGrid, fit_weight
from lowbit.methods.base import Rounder, register
from lowbit.methods.hqq_math import hqq_qparams
from lowbit.methods.rtn import rtn


@dataclass(frozen=True, eq=True)
class HqqGrid(IntGrid):
    """An integer grid whose groups are fitted by HQQ instead of min-max / MSE search (same
    name, same stored form)."""

    iters: int = 20
    lp_norm: float = 0.7

    def __repr__(self) -> str:
        return f"HqqGrid({self.name!r})"

    def _fitter(self, w: Tensor, grid: IntGrid, weight: Tensor | None):
        return hqq_qparams(w, grid.bits, grid.symmetric, grid.scale_dtype, weight,
                           iters=self.iters, lp_norm=self.lp_norm)

    def fit(self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None,
            group: int = 0) -> Params:
        if self.granularity == "tensor":
            return super().fit(w, weight, ctx=ctx, group=group)
        check_finite(w)
        scale, zero = self._fitter(w.detach().float(), self, weight)
        return {"scale": scale, "zero": zero}

    def fit_all(self, w: Tensor, sensitivity: Tensor | None = None,
                ctx: Params | None = None) -> Params:
        check_finite(w)
        scale, zero = fit_weight(w, self, sensitivity, fitter=self._fitter)
        return {"scale": scale, "zero": zero}


def hqq_grid(grid: IntGrid, iters: int = 20, lp_norm: float = 0.7) -> HqqGrid:
    return HqqGrid(grid.bits, grid.granularity, grid.group, grid.symmetric, grid.clip,
                   grid.scale_dtype, grid.act_bits, iters=iters, lp_norm=lp_norm)


@register
@dataclass(frozen=True)
class HQQ(Rounder):
    """Round to nearest with HQQ's scales and zero points (integer schemes)."""

    step = "hqq"
    iters: int = 20
    lp_norm: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters < 1:
            raise LowbitError(f"hqq: iters must be positive, not {self.iters}")
        if not 0 < self.lp_norm <= 1:
            raise LowbitError(f"hqq: lp_norm must be in (0, 1], not {self.lp_norm}")

    def check_grid(self, grid: WeightGrid) -> None:
        if not isinstance(grid, IntGrid):
            raise LowbitError(f"hqq fits integer schemes (w4g64-asym, w3g64 ...), not {grid.name}")

    def round_layers(self, weights: dict, grids: dict, stats) -> dict:
        out = {}
        for name, w in weights.items():
            t0 = time.perf_counter()
            gw = rtn(w, hqq_grid(grids[name], self.iters, self.lp_norm))
            out[name] = (gw, {"saturated": gw.n_saturated,
                              "seconds": round(time.perf_counter() - t0, 3)})
        return out
