"""The WeightGrid protocol: one interface for every weight format that RTN and GPTQ round onto.

A grid quantizes an (out, in) weight in groups of ``group_size`` consecutive input columns
(``None``: the whole row is one group). A driver (``formats.grids.rtn``,
``algorithms.gptq_grid.gptq_grid``) uses a grid in this order:

1. ``check(out, in)`` - shape rules, a LowbitError listing what is allowed.
2. ``ctx = prepare(w_full, sensitivity)`` - once per weight, before any group is fitted: the
   tensor-level parameters (NVFP4's fp32 tensor scale, per-tensor FP8 scale, ternary absmean,
   SqueezeLLM's per-row k-means tables, the second level of NF4 double quantization). GPTQ
   calls it on the original weight with ``sensitivity = diag(H)``.
3. ``params = fit(w[:, group], weight, ctx=ctx, group=g)`` - per group, on ALL output rows;
   returns every tensor ``encode``/``decode`` need (prepare's result merged in), each of shape
   (rows, 1) or a per-row table (rows, 2^b). GPTQ fits a group when its loop reaches it, on
   the already-updated weights; whole-row grids are fitted up front.
4. ``codes = encode(x, params)`` - nearest grid point for any columns x (rows, k) of the group;
   adds the number of saturated elements to ``params["saturated"]``.
5. ``params_by_group = finalize(params_by_group)`` - after all groups are fitted. Identity for
   every grid except NF4-DQ fitted without ``prepare``, whose fp32 block scales are then
   double-quantized here (bitsandbytes order) and ``encode`` must come after ``finalize``.
   With ``prepare`` (what the drivers do) NF4-DQ quantizes each block scale at fit time
   against the second-level parameters prepared from the original weight, so GPTQ chooses
   every code against the scale that will be stored and ``finalize`` changes nothing.
6. ``decode(codes, params)`` - float32 values, exactly what the runtime computes.

"Saturated" means clipped by more than half a grid step beyond the end of the grid (a value
that rounds to the largest magnitude anyway is not counted).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.minifloat import MiniFloat, max_value

Params = dict[str, Tensor]


@runtime_checkable
class WeightGrid(Protocol):
    """A weight number format that per-group rounding (RTN, GPTQ) can target."""

    name: str  # the --scheme name
    group_size: int | None  # input columns sharing one set of parameters; None = whole row
    code_bits: int  # bits per stored code

    def check(self, out_features: int, in_features: int) -> None: ...

    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params: ...

    def fit(
        self,
        w: Tensor,
        weight: Tensor | None = None,
        *,
        ctx: Params | None = None,
        group: int = 0,
    ) -> Params: ...

    def encode(self, x: Tensor, params: Params) -> Tensor: ...

    def decode(self, codes: Tensor, params: Params) -> Tensor: ...

    def finalize(self, params_by_group: list[Params]) -> list[Params]: ...

    def bits_per_weight(self, out_features: int, in_features: int) -> float: ...


class GridBase:
    """Defaults: no tensor-level stage, identity finalize, the group must divide the row."""

    name: str = ""
    group_size: int | None = None
    code_bits: int = 0
    allowed_groups: tuple[int, ...] = ()  # block sizes the format allows (for messages)

    def check(self, out_features: int, in_features: int) -> None:
        """Raise LowbitError unless the group size divides the input dimension."""
        if out_features < 1 or in_features < 1:
            raise LowbitError(f"{self.name}: empty weight ({out_features}x{in_features})")
        gs = self.group_size
        if gs is not None and in_features % gs:
            raise LowbitError(
                f"{self.name} needs the input dimension to be a multiple of its block of {gs}, "
                f"got {in_features}"
            )

    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params:
        """Tensor-level parameters; none by default."""
        check_finite(w_full)
        return {}

    def finalize(self, params_by_group: list[Params]) -> list[Params]:
        """Parameters after all groups are fitted; unchanged by default."""
        return params_by_group


def check_finite(x: Tensor, what: str = "weight") -> None:
    """LowbitError naming the count of NaN and inf values, if any."""
    if not x.is_floating_point():
        raise LowbitError(f"{what} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise LowbitError(
            f"{what} contains {n_nan} NaN and {n_inf} inf values; only finite weights "
            "can be quantized"
        )


def zero_count() -> Tensor:
    return torch.zeros((), dtype=torch.int64)


def add_saturated(params: Params, n: Tensor | int) -> None:
    """Add n clipped elements to params["saturated"] (int64 scalar)."""
    params["saturated"] = params.get("saturated", zero_count()) + torch.as_tensor(
        n, dtype=torch.int64
    )


def n_beyond(v: Tensor, lo: float, hi: float, half_lo: float, half_hi: float) -> Tensor:
    """Elements more than half a step (half_lo / half_hi) outside [lo, hi]."""
    return ((v > hi + half_hi) | (v < lo - half_lo)).sum()


def minifloat_overflow(v: Tensor, fmt: MiniFloat) -> Tensor:
    """Elements whose round-to-nearest would lie past the largest finite value."""
    vmax = max_value(fmt)
    half_ulp = 2.0 ** (fmt.emax - fmt.mbits) / 2
    return (v.abs() > vmax + half_ulp).sum()


def divisors_message(in_features: int, allowed: tuple[int, ...]) -> str:
    fits = [g for g in allowed if in_features % g == 0]
    return ", ".join(map(str, fits)) or "none"


def row_sensitivity(sensitivity: Tensor | None, rows: int, cols: int) -> Tensor | None:
    """Sensitivity (cols,) or (rows, cols) as a non-negative (rows, cols) float64 tensor."""
    if sensitivity is None:
        return None
    s = sensitivity.detach().to(torch.float64)
    if s.shape not in ((cols,), (rows, cols)):
        raise LowbitError(
            f"sensitivity must have shape ({cols},) or ({rows}, {cols}), got {tuple(s.shape)}"
        )
    check_finite(s, "sensitivity")
    return s.expand(rows, cols).clamp(min=0)
