"""``GridWeight``: a weight rounded onto a ``WeightGrid`` - the one quantized-weight type.

Codes (out, in) as the grid encodes them (uint8, or int8 for signed grids), the grid's stacked
parameters (``lowbit.formats.grid_base``), and ``g_idx`` (in,) - each input column's group -
when act-order quantized the columns in another order than their groups (grids with
``column_groups`` only). Stored as ``qweight`` (codes packed at the grid's ``code_bits``; signed
codes offset by 2^(bits-1) - 1: ternary {-1, 0, 1} -> {0, 1, 2}, MXINT8 [-127, 127] ->
[0, 254]), the grid's own parameter tensors (``grid.store``) and ``g_idx`` int32. Every stored
form decodes to exactly the in-memory parameters, so a reload is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats import pack as packing
from lowbit.formats.grid_base import (
    Params,
    WeightGrid,
    apply_grouped,
    group_params,
    n_groups,
)


@dataclass
class GridWeight:
    """``W_hat[:, c] = grid.decode(codes[:, c], params of c's group)``."""

    grid: WeightGrid
    codes: Tensor
    params: Params
    g_idx: Tensor | None = None
    saturated: Tensor | None = None  # per output row: elements clipped while encoding (not stored)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def name(self) -> str:
        return self.grid.name

    @property
    def n_saturated(self) -> int | None:
        return None if self.saturated is None else int(self.saturated.sum())

    @property
    def n_groups(self) -> int:
        return n_groups(self.grid, self.shape[1])

    def group_params(self, g: int) -> Params:
        return group_params(self.grid, self.params, g)

    def dequantize(self) -> Tensor:
        """float32 (out, in): what the quantized model computes with."""
        return apply_grouped(self.grid, self.grid.decode, self.codes, self.params, self.g_idx)

    def rows(self, start: int, stop: int) -> GridWeight:
        """Rows ``start:stop`` as views of this weight's tensors (stackable grids only)."""
        if not self.grid.stackable:
            raise LowbitError(f"{self.grid.name} weights cannot be split by rows")
        sl = slice(start, stop)
        per_row = set(self.grid.group_keys) | set(self.grid.row_keys)
        params = {k: v[sl] if k in per_row else v for k, v in self.params.items()}
        sat = None if self.saturated is None else self.saturated[sl]
        return GridWeight(self.grid, self.codes[sl], params, self.g_idx, sat)

    def split_rows(self, sizes: list[int]) -> list[GridWeight]:
        """Row blocks of a weight rounded as one (Linears that share an input). Each part owns
        its tensors (safetensors refuses tensors that share memory)."""
        parts = []
        start = 0
        for n in sizes:
            view = self.rows(start, start + n)
            parts.append(GridWeight(
                self.grid, view.codes.clone(), {k: v.clone() for k, v in view.params.items()},
                None if view.g_idx is None else view.g_idx.clone(),
                None if view.saturated is None else view.saturated.clone()))
            start += n
        return parts

    def row_blocks(self, max_elements: int) -> list[tuple[int, int]]:
        """``(start, stop)`` row ranges of at most ``max_elements`` weights each - the whole
        weight at once when its grid cannot be split by rows."""
        out_f, in_f = self.shape
        if not self.grid.stackable:
            return [(0, out_f)]
        step = max(1, max_elements // max(in_f, 1))
        return [(r, min(r + step, out_f)) for r in range(0, out_f, step)]

    @classmethod
    def cat_rows(cls, parts: list[GridWeight]) -> GridWeight:
        """One weight of row blocks on one stackable grid (the inverse of ``split_rows``)."""
        grid = parts[0].grid
        per_row = set(grid.group_keys) | set(grid.row_keys)
        params = {k: torch.cat([p.params[k] for p in parts]) if k in per_row else v
                  for k, v in parts[0].params.items()}
        sats = [p.saturated for p in parts]
        sat = None if any(x is None for x in sats) else torch.cat(sats)  # not stored
        return cls(grid, torch.cat([p.codes for p in parts]), params, parts[0].g_idx, sat)

    def bits_per_weight(self) -> float:
        """The grid's accounting for this shape, plus act-order's g_idx (one int32 per column)."""
        bpw = self.grid.bits_per_weight(*self.shape)
        if self.g_idx is not None:
            bpw += 32 / self.shape[0]
        return bpw

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def to_tensors(self) -> dict[str, Tensor]:
        """The tensors stored on disk: ``qweight``, the grid's parameters, ``g_idx``."""
        bits = self.grid.code_bits
        codes = self.codes
        if self.grid.signed_codes:
            codes = codes.to(torch.int16) + _code_offset(bits)
        out = {"qweight": packing.pack(codes, bits)}
        out |= self.grid.store(self.params, self.shape)
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx.to(torch.int32)
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(
        cls, grid: WeightGrid, shape: tuple[int, int], tensors: dict[str, Tensor]
    ) -> GridWeight:
        """Inverse of ``to_tensors``; LowbitError naming what is missing or mis-shaped."""
        out_f, in_f = shape
        try:
            packed = (out_f, packing.packed_bytes(in_f, grid.code_bits))
            if tuple(tensors["qweight"].shape) != packed:  # an edited bit width, a wrong shape
                raise ValueError(f"stored codes of shape {tuple(tensors['qweight'].shape)}, "
                                 f"{grid.code_bits}-bit codes take {packed}")
            codes = packing.unpack(tensors["qweight"], grid.code_bits, in_f)
            if grid.signed_codes:
                codes = (codes.to(torch.int16) - _code_offset(grid.code_bits)).to(torch.int8)
            params = grid.load(tensors, shape)
            _check_groups(grid, params, shape)
        except KeyError as e:
            raise LowbitError(f"{grid.name} weight lacks the tensor {e}") from None
        except (ValueError, RuntimeError) as e:
            raise LowbitError(f"{grid.name} weight of shape {shape}: {e}") from None
        g_idx = tensors.get("g_idx")
        return cls(grid, codes, params, None if g_idx is None else g_idx.to(torch.int32))


def _check_groups(grid: WeightGrid, params: Params, shape: tuple[int, int]) -> None:
    """Stacked per-group parameters have one column per group (an edited group size does not
    decode)."""
    if not grid.stackable:
        return
    want = (shape[0], n_groups(grid, shape[1]))
    for k in grid.group_keys:
        v = params.get(k)
        if v is not None and v.dim() == 2 and tuple(v.shape) != want:
            raise ValueError(f"parameter {k!r} of shape {tuple(v.shape)}, {grid.name} takes "
                             f"{want}")


def _code_offset(bits: int) -> int:
    return (1 << (bits - 1)) - 1
