"""Fake quantization for training (QAT, learned rounding): the forward pass computes the
rounded weight a grid stores, the backward pass the straight-through estimator (STE).

The STE of the reference documents: ``round`` passes the gradient through unchanged, and
``clamp`` passes it only inside the clip range, so ``d w_hat / d w`` is 1 where ``w`` lies
within the grid's range and 0 where the grid clips it.

- ``fake_quant(w, grid, params)``: any weight grid (integer, NF4, FP4/NVFP4, MX, ...): the
  forward value is the grid's own round trip, so training sees exactly the numbers that will
  be stored; the gradient reaches ``w`` where ``grid.saturated`` says the grid does not clip.
- ``lsq_int``: integer grids with learnable scales, as LSQ defines them:
  ``w_hat = s (clamp(round(w / s + v) + z, 0, 2^b - 1) - z)`` with ``round`` straight-through,
  so ``d w_hat / d s`` is ``round(w/s) - w/s`` inside the range and ``-z`` or ``2^b - 1 - z``
  where it clips; the scale's gradient is multiplied by ``1 / sqrt(n * (2^b - 1))`` (n: weights
  per scale), LSQ's gradient scaling. ``v``: optional rounding offsets (AutoRound), kept in
  [-0.5, 0.5] by the caller (``clamp_offsets``).
- ``fake_quant_activations``: per-token symmetric integer activations (W8A8, W4A8), STE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.formats.grid_base import Params, WeightGrid, grouped_args


def ste_round(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, g: float) -> Tensor:
    """``x`` forward, its gradient multiplied by ``g`` backward (LSQ)."""
    return (x - x * g).detach() + x * g


class _GridSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, grid: WeightGrid, params: Params) -> Tensor:
        xv, pv = grouped_args(grid, w.detach().float(), params)
        _, w_hat = grid.round_trip(xv, pv)
        inside = ~grid.saturated(xv, pv)
        ctx.save_for_backward(inside.reshape(w.shape))
        return w_hat.reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def fake_quant(w: Tensor, grid: WeightGrid, params: Params) -> Tensor:
    """``w`` (out, in) rounded onto ``grid`` with ``params`` (the grid's fitted parameters,
    e.g. ``grid.fit_all(w)``), straight-through where the grid does not clip."""
    return _GridSTE.apply(w, grid, params)


def lsq_int(w: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int | None,
            offsets: Tensor | None = None) -> Tensor:
    """LSQ fake quantization of ``w`` (out, in) onto ``bits``-bit codes with per-group
    ``scale`` and integer ``zero`` (out, n_groups), ``group_size`` columns per group (None: one
    per row); gradients reach ``w``, ``scale`` (scaled as LSQ scales them) and ``offsets``."""
    qmax = (1 << bits) - 1
    rows, cols = w.shape
    gs = cols if group_size is None else group_size
    if cols % gs:
        raise ValueError(f"{cols} columns do not split into groups of {gs}")
    s = grad_scale(scale, 1.0 / math.sqrt(gs * qmax)).unsqueeze(-1)
    z = zero.detach().unsqueeze(-1)
    x = w.reshape(rows, cols // gs, gs) / s
    if offsets is not None:
        x = x + offsets.reshape(x.shape)
    q = torch.clamp(ste_round(x) + z, 0, qmax)
    return (s * (q - z)).reshape(rows, cols)


def clamp_offsets(offsets: Tensor) -> None:
    """Keep learned rounding offsets in [-0.5, 0.5] (in place, after an optimiser step): each
    weight then rounds to one of its two neighbouring levels."""
    with torch.no_grad():
        offsets.clamp_(-0.5, 0.5)


def fake_quant_activations(x: Tensor, bits: int) -> Tensor:
    """Per-token (last axis) symmetric ``bits``-bit activations, ``max|x| / (2^(b-1) - 1)``
    scales, straight-through inside the range (the range is each token's own maximum, so
    nothing clips)."""
    qmax = (1 << (bits - 1)) - 1
    s = x.detach().abs().amax(-1, keepdim=True) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    return ste_round(x / s).clamp(-qmax, qmax) * s



def level_gaps(grid: WeightGrid, w: Tensor, params: Params) -> Tensor:
    """(out, in): for every weight, the distance between the grid value at or below it and the
    next one above (its group's scale for an integer grid; NF4's, FP4's, MX's uneven gaps
    times their scales); at or above the top level, the gap below it, and below the lowest
    level the gap above it. An offset of
    ``v`` gaps added to a weight moves it ``v`` of the way to its neighbouring level: learned
    rounding on any grid of at most 16 levels."""
    if grid.code_bits > 4:
        raise ValueError(f"{grid.name}: {1 << grid.code_bits} levels; level_gaps enumerates "
                         "at most 16")
    rows = w.shape[0]
    step = max(1, (1 << 22) // max(1, w.shape[1]))  # rows at a time: bounded temporaries
    if rows > step:
        def part(v, sl):
            return v[sl] if isinstance(v, Tensor) and v.dim() and v.shape[0] == rows else v
        return torch.cat([level_gaps(grid, w[r:r + step],
                                     {k: part(v, slice(r, r + step)) for k, v in params.items()})
                          for r in range(0, rows, step)])
    x, p = grouped_args(grid, w.detach().float(), params)
    k = 1 << grid.code_bits
    codes = torch.arange(-(k // 2 - 1), k // 2) if grid.signed_codes else torch.arange(k)
    codes = codes.to(grid.encode(x, p).dtype)
    wide = {n: v.unsqueeze(-1) if n in grid.group_keys else v for n, v in p.items()}
    levels = grid.decode(codes, wide).float()  # (..., 1 or columns, k)
    x = x.unsqueeze(-1)
    inf = torch.tensor(float("inf"))
    below = torch.where(levels <= x, levels, -inf).amax(-1, keepdim=True)
    above = torch.where(levels > x, levels, inf).amin(-1, keepdim=True)
    under = torch.where(levels < below, levels, -inf).amax(-1)  # the level before ``below``
    over = torch.where(levels > above, levels, inf).amin(-1)  # the level after ``above``
    below, above = below.squeeze(-1), above.squeeze(-1)
    gap = torch.where(torch.isfinite(above), above - below, below - under)
    gap = torch.where(torch.isfinite(below), gap, over - above)
    return torch.where(torch.isfinite(gap), gap, 0.0).reshape(w.shape)
