"""The WeightGrid protocol: one interface for every weight number format, integer affine included.

A grid quantizes an (out, in) weight in groups of ``group_size`` consecutive input columns
(``None``: the whole row is one group). Rounders (RTN, GPTQ, HQQ in ``lowbit.methods``) use a
grid in this order:

1. ``check(out, in)`` - shape rules, a LowbitError listing what is allowed.
2. ``ctx = prepare(w_full, sensitivity)`` - once per weight: tensor-level parameters (NVFP4's
   fp32 tensor scale, per-tensor scales, ternary absmean, SqueezeLLM's per-row k-means tables,
   the second level of NF4 double quantization). GPTQ passes ``sensitivity = diag(H)``.
3. ``fit(w[:, group], weight, ctx=ctx, group=g)`` - one group's parameters, on ALL output rows,
   each of shape (rows, 1) (or a per-row table); ``fit_all`` fits every group at once and
   returns them stacked (below). GPTQ fits a group when its loop reaches it.
4. ``finalize(params)`` - after all groups are fitted (NF4-DQ fitted without ``prepare``).
5. ``encode(x, params)`` / ``decode(codes, params)`` - elementwise: every parameter broadcasts
   against x, so one call covers one column, one group, or a whole weight viewed as
   (rows, groups, group_size) with the group parameters given a trailing axis.
6. ``store(params, shape)`` / ``load(tensors, shape)`` - the grid's own compact stored form.

Stacked parameters (``Params``): a key in ``group_keys`` is a (rows, n_groups) tensor, one
column per group; every other key is a tensor-level value or a per-row table, shared by all
groups. "Saturated" means clipped by more than half a grid step beyond the end of the grid (a
value that rounds to the largest magnitude anyway is not counted).
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
    """A weight number format that the rounders can target."""

    name: str  # the --scheme name; get_grid(name) rebuilds the grid
    group_size: int | None  # input columns sharing one set of parameters; None = whole row
    code_bits: int  # bits per stored code
    signed_codes: bool  # codes are int8 (ternary, MXINT8), stored offset by 2^(bits-1) - 1
    symmetric: bool  # the representable range is symmetric around 0
    group_keys: tuple[str, ...]  # parameters stacked as (rows, n_groups)
    row_keys: tuple[str, ...]  # parameters with one row per output row, shared by the groups
    column_groups: bool  # a group may be any set of columns (act-order's g_idx)
    needs_sensitivity: bool  # rounding itself needs the Hessian diagonal (SqueezeLLM)
    stackable: bool  # rows are independent: Linears sharing an input may be rounded as one

    def check(self, out_features: int, in_features: int) -> None: ...

    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params: ...

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params: ...

    def fit_all(self, w: Tensor, sensitivity: Tensor | None = None,
                ctx: Params | None = None) -> Params: ...

    def finalize(self, params: Params) -> Params: ...

    def encode(self, x: Tensor, params: Params) -> Tensor: ...

    def decode(self, codes: Tensor, params: Params) -> Tensor: ...

    def round_trip(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """(codes, decoded values) of x: ``encode`` then ``decode``, in one call."""

    def saturated(self, x: Tensor, params: Params) -> Tensor:
        """Mask (x's shape) of the elements the grid clips."""

    def bits_per_weight(self, out_features: int, in_features: int) -> float: ...

    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]: ...

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params: ...


class GridBase:
    """Defaults: no tensor-level stage, identity finalize, the group must divide the row,
    parameters stored as they are (``p_<key>``)."""

    name: str = ""
    group_size: int | None = None
    code_bits: int = 0
    signed_codes: bool = False
    symmetric: bool = True
    group_keys: tuple[str, ...] = ()
    row_keys: tuple[str, ...] = ()
    column_groups: bool = False
    needs_sensitivity: bool = False
    stackable: bool = True
    allowed_groups: tuple[int, ...] = ()  # block sizes the format allows (for messages)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and getattr(other, "name", None) == self.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))

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

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        raise NotImplementedError

    def fit_all(self, w: Tensor, sensitivity: Tensor | None = None,
                ctx: Params | None = None) -> Params:
        """Every group's parameters, stacked: group by group ``fit`` on the group's columns
        (``sensitivity`` (in,) or (out, in) sliced alike)."""
        per_group = []
        for g, sl in enumerate(group_slices(self, w.shape[1])):
            weight = None if sensitivity is None else sensitivity[..., sl].float()
            per_group.append(self.fit(w[:, sl], weight, ctx=ctx, group=g))
        return stack_groups(self, per_group)

    def finalize(self, params: Params) -> Params:
        """Parameters after all groups are fitted; unchanged by default."""
        return params

    def round_trip(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        codes = self.encode(x, params)
        return codes, self.decode(codes, params)

    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]:
        return {f"p_{k}": v for k, v in params.items()}

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params:
        return {k.removeprefix("p_"): v for k, v in tensors.items() if k.startswith("p_")}


def group_slices(grid: WeightGrid, in_features: int) -> list[slice]:
    """The column slices sharing one set of parameters (the last may be partial where the
    grid's ``check`` allows it)."""
    gs = grid.group_size or in_features
    return [slice(c, min(c + gs, in_features)) for c in range(0, in_features, gs)]


def n_groups(grid: WeightGrid, in_features: int) -> int:
    gs = grid.group_size or in_features
    return -(-in_features // gs)


def stack_groups(grid: WeightGrid, per_group: list[Params]) -> Params:
    """Per-group parameter dicts ((rows, 1) each) -> stacked (rows, n_groups); keys outside
    ``group_keys`` are taken from the first group (they are shared)."""
    first = per_group[0]
    out = {}
    for k, v in first.items():
        out[k] = torch.cat([p[k] for p in per_group], 1) if k in grid.group_keys else v
    return out


def group_params(grid: WeightGrid, params: Params, g: int) -> Params:
    """The parameters of group ``g`` ((rows, 1) views of the group keys)."""
    return {k: v[:, g : g + 1] if k in grid.group_keys else v for k, v in params.items()}


def column_params(grid: WeightGrid, params: Params, groups: Tensor) -> Params:
    """Parameters for columns whose groups are ``groups`` (one int per column)."""
    idx = groups.long()
    return {k: v[:, idx] if k in grid.group_keys else v for k, v in params.items()}


def grouped_args(grid: WeightGrid, x: Tensor, params: Params,
                 g_idx: Tensor | None = None) -> tuple[Tensor, Params]:
    """(x, params) arranged so that an elementwise grid call (encode, decode, saturated)
    covers a whole (rows, in) tensor: x viewed as (rows, groups, group_size) with a trailing
    axis on the group parameters where the groups tile the row, else per-column parameters
    (from ``g_idx``, or the contiguous groups). Results of shape x.shape may be viewed back
    with ``reshape(rows, in)``."""
    rows, cols = x.shape
    gs = grid.group_size
    if g_idx is None:
        if gs is None:
            return x, params
        if cols % gs == 0:
            view = {k: v.unsqueeze(-1) if k in grid.group_keys else v for k, v in params.items()}
            return x.reshape(rows, cols // gs, gs), view
        g_idx = torch.arange(cols) // gs
    return x, column_params(grid, params, g_idx)


def apply_grouped(grid: WeightGrid, fn, x: Tensor, params: Params,
                  g_idx: Tensor | None = None) -> Tensor:
    """``fn(x, params)`` (encode or decode) over a whole (rows, in) tensor."""
    xv, pv = grouped_args(grid, x, params, g_idx)
    return fn(xv, pv).reshape(x.shape)


FINITE_CHUNK = 1 << 22  # elements checked at once: torch.isfinite allocates ~2 bytes per element


def all_finite(x: Tensor) -> bool:
    """Whether every element is finite, checked in chunks: ``torch.isfinite(x).all()`` on a whole
    256 MiB fp32 matrix allocates 450 MiB of temporaries (measured), more than the matrix."""
    if not x.is_floating_point():
        return True
    if x.numel() <= FINITE_CHUNK:
        return bool(torch.isfinite(x).all())
    if x.is_contiguous():
        return all(bool(torch.isfinite(c).all()) for c in x.view(-1).split(FINITE_CHUNK))
    rows = max(1, FINITE_CHUNK // max(1, x[0].numel()))
    return all(all_finite(c) for c in x.split(rows))


def check_finite(x: Tensor, what: str = "weight") -> None:
    """LowbitError naming the count of NaN and inf values, if any."""
    if not x.is_floating_point():
        raise LowbitError(f"{what} must be a floating-point tensor, got {x.dtype}")
    if not all_finite(x):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise LowbitError(
            f"{what} contains {n_nan} NaN and {n_inf} inf values; only finite weights "
            "can be quantized"
        )


def beyond(v: Tensor, lo: float, hi: float, half_lo: float, half_hi: float) -> Tensor:
    """Mask of the elements more than half a step (half_lo / half_hi) outside [lo, hi]."""
    return (v > hi + half_hi) | (v < lo - half_lo)


def minifloat_overflow(v: Tensor, fmt: MiniFloat) -> Tensor:
    """Mask of the elements whose round-to-nearest would lie past the largest finite value."""
    vmax = max_value(fmt)
    half_ulp = 2.0 ** (fmt.emax - fmt.mbits) / 2
    return v.abs() > vmax + half_ulp


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


def fp16_if_exact(t: Tensor) -> Tensor:
    """``t`` as fp16 when that is exact, else unchanged (stored forms)."""
    h = t.to(torch.float16)
    return h if torch.equal(h.float(), t) else t


def one_value(t: Tensor) -> Tensor | None:
    """The single value of a tensor whose elements are all equal, as shape (1,)."""
    flat = t.reshape(-1)
    return flat[:1].clone() if torch.equal(flat, flat[:1].expand_as(flat)) else None
