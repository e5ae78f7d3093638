"""A lowbit integer grid written into llama.cpp's 32-weight block types as it is.

A Linear that lowbit quantized onto an integer grid (a ``QLinear`` holding an ``IntGrid``
weight, ``w_hat = scale * (q - zero)`` per group) is written from its codes and scales, with
no second rounding, when the ggml type its tensor gets can hold the grid:

| type | block decodes to | holds (levels q - zero; codes q) | written with |
|---|---|---|---|
| Q4_0 | d (c - 8), c in 0..15 | levels in -8..7: sym 2-4, asym 2-3 | d = s, c = q - z + 8 |
| Q5_0 | d (c - 16), c in 0..31 | levels in -16..15: sym 2-5, asym 2-4 | d = s, c = q - z + 16 |
| Q8_0 | d c, c in -128..127 | levels in -128..127: sym 2-8, asym 2-7 | d = s, c = q - z |
| Q4_1 | d c + m, c in 0..15 | codes in 0..15: 2-4 bits | d = s, c = q, m = -s z |
| Q5_1 | d c + m, c in 0..31 | codes in 0..31: 2-5 bits | d = s, c = q, m = -s z |
| TQ1_0, TQ2_0 | d t, t in -1..1 (256 weights) | ternary | d = gamma, t = code |

A ternary weight (BitNet b1.58's ``gamma * t``) goes into TQ1_0/TQ2_0 where 256 divides its
rows, and as it is into Q4_0/Q5_0/Q8_0 (levels -1..1, d = gamma) where llama.cpp falls back
from TQ to Q4_0 for shorter rows.

and when each group is whole blocks: groups of a multiple of 32 weights (a group of 64 is two
blocks with the same d), or one scale per row or per tensor, and no act-order ``g_idx``. d and
m are rounded to float16, the only approximation: lowbit's scales are float16 already (unless
the scheme asked for float32), so the Q4_0/Q5_0/Q8_0 blocks decode to exactly lowbit's
weights; m = -scale * zero is generally not a float16 and moves each weight of its block by at
most 2^-11 |m| (half a float16 step). K-quants (their sub-block scales are themselves
quantized), IQ4 (non-uniform levels) and other grids (NF4, FP4, MX ...) cannot hold a lowbit
grid; those tensors are re-encoded from the dequantized weight, and `note` says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lowbit.formats import ggml, ggml_t
from lowbit.formats.grid_base import WeightGrid
from lowbit.formats.grids_lut import TernaryGrid
from lowbit.formats.integer import IntGrid
from lowbit.runtime.qlinear import QLinear

# types a grid is carried into, by bits per weight (the order `--type native` tries them)
BY_SIZE = ("TQ1_0", "TQ2_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
TERNARY = ("TQ1_0", "TQ2_0")
_LEVELS = {"Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q8_0": (-128, 127)}  # d * level, level = q - z
_OFFSET = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}  # stored code = level + offset


def grid_of(mods: list[nn.Module]) -> tuple[WeightGrid | None, str]:
    """The integer (or ternary) grid of the modules making one tensor (one Linear, or stacked
    experts), or None and why there is none."""
    if not all(isinstance(m, QLinear) for m in mods):
        kind = next(type(m).__name__ for m in mods if not isinstance(m, QLinear))
        return None, f"a {kind} holds no integer grid weight"
    grids = {m.grid for m in mods}
    if len(grids) > 1:
        return None, "its experts are on different grids"
    grid = grids.pop()
    if isinstance(grid, TernaryGrid):
        return grid, ""
    if not isinstance(grid, IntGrid):
        return None, f"{grid.name} is not an integer grid"
    if grid.act_bits is not None:
        return None, (f"{grid.name} rounds activations at run time, which GGUF does not record "
                      "(llama.cpp rounds them its own way)")
    return grid, ""


def levels(grid: WeightGrid) -> tuple[int, int]:
    """The range of q - zero: symmetric grids fix zero = 2^(b-1); an asymmetric zero point is
    any code; ternary codes are the levels -1..1."""
    if isinstance(grid, TernaryGrid):
        return -1, 1
    if grid.symmetric:
        half = 1 << (grid.bits - 1)
        return -half, half - 1
    return -grid.qmax, grid.qmax


def why_not(t: str, grid: WeightGrid, cols: int) -> str | None:
    """Why ggml type ``t`` cannot hold ``grid`` for rows of ``cols`` weights; None when it can."""
    ternary = isinstance(grid, TernaryGrid)
    if t in TERNARY:
        if not ternary:
            return f"{t} holds ternary weights, not {grid.name}"
        return None if cols % ggml_t.QK == 0 else \
            f"rows of {cols} weights are not whole {ggml_t.QK}-weight blocks"
    if ternary and t not in _LEVELS:
        return "ternary weights go into TQ1_0, TQ2_0, Q4_0, Q5_0 or Q8_0"
    if t in _LEVELS:
        (lo, hi), (tlo, thi) = levels(grid), _LEVELS[t]
        if lo < tlo or hi > thi:
            return f"{grid.name}'s levels {lo}..{hi} exceed its {tlo}..{thi}"
    elif t in ggml.AFFINE:
        top = ggml.CODE_RANGE[t][1]
        if grid.qmax > top:
            return f"{grid.name}'s codes 0..{grid.qmax} exceed its 0..{top}"
    elif t in ("F32", "F16"):
        return "a float type: lowbit's dequantized weight, as for any model"
    else:
        return "its blocks cannot hold integer codes and scales as they are"
    width = grid.group if getattr(grid, "granularity", None) == "group" else cols
    if width % 32:
        return f"{grid.name}'s groups of {width} are not whole 32-weight blocks"
    return None


def native_type(mods: list[nn.Module], cols: int) -> str | None:
    """The smallest block type that holds the modules' grid (``--type native``), or None."""
    grid, _ = grid_of(mods)
    if grid is None:
        return None
    return next((t for t in BY_SIZE if why_not(t, grid, cols) is None), None)


def carry(t: str, mods: list[nn.Module], reorder: Callable[[np.ndarray], np.ndarray] | None
          ) -> tuple[np.ndarray | None, str]:
    """``t``'s blocks (rows, bytes) written from the modules' codes and scales (stacked
    experts: their rows one after another; ``reorder`` permutes rows, e.g. llama's q/k), or
    None and why ``t`` cannot hold them."""
    grid, reason = grid_of(mods)
    if grid is None:
        return None, reason
    cols = mods[0].in_features
    reason = why_not(t, grid, cols)
    if reason:
        return None, reason
    weights = [m.grid_weight() for m in mods]
    if any(w.g_idx is not None for w in weights):
        return None, "act-order's g_idx groups columns out of order"
    q = np.concatenate([w.codes.to(torch.int16).numpy() for w in weights])
    if isinstance(grid, TernaryGrid):  # codes are the levels, one gamma per tensor
        scale = np.concatenate([w.params["gamma"].float().reshape(-1, 1).expand(
            w.shape[0], 1).numpy() for w in weights])
        zero = np.zeros_like(scale)
    else:
        scale = np.concatenate([w.params["scale"].float().numpy() for w in weights])
        zero = np.concatenate([w.params["zero"].float().numpy() for w in weights])
    if reorder is not None:
        q, scale, zero = reorder(q), reorder(scale), reorder(zero)
    if t in TERNARY:
        if not np.isfinite(scale.astype(np.float16)).all():
            return None, "its scales exceed float16"
        rows = q.shape[0]
        blocks = ggml_t.pack(t, q.reshape(-1, ggml_t.QK),
                             np.repeat(scale, cols // ggml_t.QK, axis=1).reshape(-1, 1))
        return blocks.reshape(rows, -1), ""
    per_block = cols // 32 // scale.shape[1]  # blocks per group
    d = np.repeat(scale, per_block, axis=1)
    z = np.repeat(zero, per_block, axis=1)
    m = None
    if t in ggml.AFFINE:
        m = -d * z
        codes = q
    else:
        if not np.array_equal(z, np.round(z)):
            return None, "its zero points are not integers"
        codes = q - np.repeat(z.astype(np.int16), 32, axis=1) + _OFFSET[t]
    for v in (d, m):
        if v is not None and not np.isfinite(v.astype(np.float16)).all():
            return None, "its scales exceed float16"
    return ggml.from_codes(t, codes, d, m), ""


def summary(carried: int, reencoded: dict[str, tuple[str, str]]) -> str | None:
    """One line: how many quantized tensors were written from lowbit's codes, how many
    re-encoded from their dequantized weights, and why."""
    if not carried and not reencoded:
        return None
    parts = []
    if carried:
        parts.append(f"{carried} written from lowbit's codes and scales as they are")
    if reencoded:
        why = Counter(reencoded.values())
        parts.append(f"{len(reencoded)} re-encoded from their dequantized weights, so rounded "
                     "a second time: " + ", ".join(f"{k} as {t} ({r})"
                                                   for (t, r), k in why.most_common()))
    return f"of {carried + len(reencoded)} quantized weight tensors, " + "; ".join(parts)
