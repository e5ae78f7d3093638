"""GPTQ (Frantar et al., 2022): column-by-column rounding with inverse-Hessian error feedback,
onto any ``WeightGrid``.

The weights of one Linear are rounded one input column at a time; the rounding error of a
column is pushed onto the columns not yet rounded through the upper Cholesky factor of
(H + lambda I)^-1 (H = 2 X^T X / n from calibration inputs). Updates are applied lazily per
block of ``block_size`` columns (a multiple of the group size). Tensor-level parameters
(``grid.prepare``) come from the original weight with sensitivity diag(H); per-group
parameters are fitted when the loop reaches the group, on the already-updated weights; whole-row
grids are fitted up front.

Act-order (on by default where the grid allows arbitrary column groups, i.e. integer grids)
rounds columns by decreasing H diagonal. Groups are then formed in that order and ``g_idx``
records each column's group; with ``static_groups`` - and on grids whose blocks are fixed by
the format (NF4, MX, NVFP4, ...) - the groups keep their columns and are fitted up front on the
original weight, and only the rounding order changes.

Linears that share an input share H: ``prepare_hessian`` factors it once, and Linears on the
same stackable grid are rounded as one stacked weight (rows are independent given H).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import (
    Params,
    WeightGrid,
    check_finite,
    column_params,
    group_params,
    n_groups,
    stack_groups,
)
from lowbit.formats.weight import GridWeight
from lowbit.methods.base import Rounder, register
from lowbit.methods.rtn import grid_loss, rtn
from lowbit.methods.sparsity import Sparsity, obs_scores, select

log = logging.getLogger(__name__)


@dataclass
class Hessian:
    """H of one shared input, prepared for GPTQ: dead inputs fixed, act-order permutation,
    the upper Cholesky factor of the damped inverse."""

    diag: Tensor  # diag(H) with dead inputs set to 1 (original column order)
    dead: Tensor  # inputs that never fired
    perm: Tensor | None  # act-order: columns by decreasing diag(H)
    u: Tensor  # upper Cholesky factor of (H + lambda I)^-1, in the permuted order
    damp: float  # lambda actually used


def _damped_inverse_cholesky(h: Tensor, diag: Tensor, perm: Tensor | None,
                             damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1 for H = ``h`` permuted by ``perm`` with
    diagonal ``diag``, raising lambda until H is positive definite. At most three n x n
    matrices live at once (``h`` included): on an 8192-input down_proj each is 256 MiB."""
    mean_diag = float(diag.mean())
    lam = damp * mean_diag
    if perm is not None:
        diag = diag[perm]
    for _ in range(8):
        H = h[perm[:, None], perm] if perm is not None else h.clone()
        H.diagonal().copy_(diag + lam)
        l_factor, info = torch.linalg.cholesky_ex(H)
        del H
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l_factor)
            del l_factor
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0:
                return u, lam
        new = max(lam * 10, 1e-8 * max(mean_diag, 1e-8))
        log.warning("Cholesky failed with damping %.3g; retrying with %.3g", lam, new)
        lam = new
    raise LowbitError("the Hessian is not positive definite even after heavy damping")


def prepare_hessian(h: Tensor, act_order: bool, damp: float = 0.01) -> Hessian:
    """Factor H once for every Linear that reads the same input (``h`` is not modified)."""
    check_finite(h, "Hessian")
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise LowbitError(f"a Hessian must be square, got {tuple(h.shape)}")
    h = h.detach().float()
    diag = h.diagonal().clone()
    dead = diag == 0
    diag[dead] = 1
    perm = torch.argsort(diag, descending=True) if act_order else None
    u, lam = _damped_inverse_cholesky(h, diag, perm, damp)
    return Hessian(diag, dead, perm, u, lam)


def gptq_quantize(
    w: Tensor, hes: Hessian, grid: WeightGrid, block_size: int = 128,
    static_groups: bool = False, keep: Tensor | None = None, prune: Sparsity | None = None,
) -> GridWeight:
    """Round an (out, in) weight with GPTQ given its prepared input Hessian.

    ``keep`` (bool, the weight's shape): weights outside it are stored as the grid's zero and
    their whole value is fed back like a rounding error (rounding after pruning). ``prune``:
    SparseGPT's joint sweep - the weights to drop are chosen as the loop reaches them, by
    ``obs_scores`` on the already-updated weights: over each block of columns for a fraction,
    per group of M columns for N:M (which needs the columns in their own order: no act-order).
    """
    check_finite(w)
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    if hes.diag.shape[0] != in_f:
        raise LowbitError(f"Hessian of size {hes.diag.shape[0]} for a weight with {in_f} inputs")
    grid.check(out_f, in_f)
    W[:, hes.dead] = 0
    ctx = grid.prepare(W, hes.diag)
    gs = grid.group_size
    perm = hes.perm
    # groups fitted up front (on the original order): whole-row grids, and act-order with groups
    # that must keep their columns
    prefit = gs is None or (perm is not None and (static_groups or not grid.column_groups))
    params: Params | None = grid.fit_all(W, hes.diag, ctx) if prefit else None
    if gs is None:
        gs, bs = in_f, block_size
        col_group = torch.zeros(in_f, dtype=torch.long)
    else:
        bs = gs * max(1, block_size // gs)
        col_group = torch.arange(in_f) // gs
    if perm is not None:
        W = W[:, perm]
        if prefit:
            col_group = col_group[perm]  # each column keeps its original group
    hdiag = hes.diag if perm is None else hes.diag[perm]
    U = hes.u
    if prune is not None and prune.nm and (perm is not None or bs % prune.m):
        raise LowbitError(f"{prune} sparsity in the GPTQ sweep needs the columns in order "
                          f"(act_order off) and blocks that are multiples of {prune.m}")
    if keep is not None and perm is not None:
        keep = keep[:, perm]
    col_group = col_group.tolist()

    fitted: list[Params | None] = [None] * n_groups(grid, in_f)
    views: dict[int, Params] = {}
    code_cols: list[Tensor] = []
    saturated = torch.zeros(out_f, dtype=torch.int64)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = W[:, i1:i2].clone()
        X1 = torch.empty_like(W1)  # each column as it was rounded (for the clipped count)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        K1 = None if keep is None else keep[:, i1:i2]
        if prune is not None and not prune.nm:
            K1 = select(obs_scores(W1, U1.diagonal()), prune)
        elif prune is not None:
            K1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = i1 + i
            if prune is not None and prune.nm and i % prune.m == 0:
                K1[:, i : i + prune.m] = select(
                    obs_scores(W1[:, i : i + prune.m], U1.diagonal()[i : i + prune.m]), prune)
            g = col_group[col]
            p = views.get(g)
            if p is None:
                if prefit:
                    p = group_params(grid, params, g)
                else:  # first column of a group: the group lies inside this block
                    p = fitted[g] = grid.fit(W1[:, i : i + gs], hdiag[col : col + gs], ctx=ctx,
                                             group=g)
                views[g] = p
            x = W1[:, i : i + 1]
            X1[:, i : i + 1] = x
            q, x_hat = grid.round_trip(x, p)
            if K1 is not None:
                q, x_hat = _zero_outside(grid, x, p, q, x_hat, K1[:, i : i + 1])
            code_cols.append(q)
            err = (W1[:, i] - x_hat[:, 0]) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # in place: no (rows, block) temporary
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
        groups = col_group[i1:i2]
        if prefit:
            block_params, local = params, groups
        else:  # the block's groups, in order
            first = groups[0]
            block_params = stack_groups(grid, fitted[first : groups[-1] + 1])
            local = [c - first for c in groups]
        cp = column_params(grid, block_params, torch.tensor(local))
        saturated += grid.saturated(X1, cp).sum(1)

    codes = torch.cat(code_cols, 1)
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if not prefit:  # groups formed in rounding order: record each column's group
            g_idx = torch.tensor(col_group, dtype=torch.int32)[inv]
    if not prefit:
        params = stack_groups(grid, fitted)  # type: ignore[arg-type]
    return GridWeight(grid, codes, grid.finalize(params), g_idx, saturated)


def _zero_outside(grid: WeightGrid, x: Tensor, p: Params, q: Tensor, x_hat: Tensor,
                  k: Tensor) -> tuple[Tensor, Tensor]:
    """Codes and values of a column with the weights outside ``k`` set to the grid's zero."""
    q0, x0 = grid.round_trip(torch.zeros_like(x), p)
    if bool((x0[~k] != 0).any()):
        raise LowbitError(f"{grid.name} cannot store a pruned weight: zero is not on its grid "
                          "(choose a grid with an exact zero: symmetric or integer zero points)")
    return torch.where(k, q, q0), torch.where(k, x_hat, x0)


def layer_losses(w: Tensor, gw: GridWeight, h: Tensor) -> dict:
    """Layer-output loss of ``gw`` and of plain RTN of ``w`` onto the same grid, on H."""
    w0, h0 = w.detach().float(), h.detach().float()
    sens = torch.diag(h0) if gw.grid.needs_sensitivity else None
    return {"loss": grid_loss(gw, w0, h0),
            "rtn_loss": grid_loss(rtn(w0, gw.grid, sens), w0, h0)}


@register
@dataclass(frozen=True)
class GPTQ(Rounder):
    """GPTQ onto each layer's grid. ``act_order`` None = on where the grid allows column groups
    (integer grids), off elsewhere (the measured default; BENCHMARKS.md). ``static_groups``
    (default): act-order's rounding order with each group's parameters fitted on its own
    contiguous columns before rounding, so no ``g_idx`` is stored and every serving format and
    kernel holds the result; off, groups follow the rounding order and a ``g_idx`` maps
    columns to groups (GPTQ layout only). Static groups measured as good or better (BENCHMARKS.md,
    issue 14)."""

    row_separable: ClassVar[bool] = True
    keeps_zeros: ClassVar[bool] = True  # rounds pruned Linears (methods.prune)

    step = "gptq"
    act_order: bool | None = None
    static_groups: bool = True
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.damp < 1:
            raise LowbitError(f"gptq: damp is a fraction of the mean Hessian diagonal in [0, 1), "
                              f"not {self.damp}")
        if self.block_size < 1:
            raise LowbitError(f"gptq: block_size must be positive, not {self.block_size}")

    def wants(self, grid: WeightGrid) -> frozenset[str]:
        return frozenset({"hessian"})

    def act_order_for(self, grid: WeightGrid) -> bool:
        return grid.column_groups if self.act_order is None else self.act_order

    def round_layers(self, weights: dict, grids: dict, stats, sparse: dict | None = None) -> dict:
        """One prepared H per act-order setting; Linears on the same stackable grid are rounded
        as one stacked weight. ``sparse``: name -> keep mask (pruned before) or ``Sparsity``
        (pruned in the same sweep, SparseGPT's joint mode); such Linears are rounded alone."""
        sparse = sparse or {}
        hessians: dict[bool, Hessian] = {}
        batches: dict[WeightGrid, list[str]] = {}
        singles: list[list[str]] = []
        for name in weights:
            g = grids[name]
            if g.stackable and name not in sparse:
                batches.setdefault(g, []).append(name)
            else:
                singles.append([name])
        out = {}
        for names in [*batches.values(), *singles]:
            t0 = time.perf_counter()
            grid = grids[names[0]]
            act = self.act_order_for(grid)
            sp = sparse.get(names[0])
            if isinstance(sp, Sparsity) and sp.nm:
                act = False  # N:M groups are runs of columns in their own order
            if act not in hessians:
                hessians[act] = prepare_hessian(stats.h, act, self.damp)
            hes = hessians[act]
            ws = [weights[n] for n in names]
            w = ws[0] if len(ws) == 1 else torch.cat(ws)
            gw = gptq_quantize(w, hes, grid, self.block_size, self.static_groups,
                               keep=sp if isinstance(sp, Tensor) else None,
                               prune=sp if isinstance(sp, Sparsity) else None)
            parts = [gw] if len(ws) == 1 else gw.split_rows([x.shape[0] for x in ws])
            secs = round((time.perf_counter() - t0) / len(names), 3)
            for name, x, part in zip(names, ws, parts, strict=True):
                info = layer_losses(x, part, stats.h) | {
                    "damp": hes.damp, "seconds": secs, "saturated": part.n_saturated,
                    "act_order": ("static" if part.g_idx is None else "g_idx") if act else "off",
                }
                out[name] = (part, info)
        return out
