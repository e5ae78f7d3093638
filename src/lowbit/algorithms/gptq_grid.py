"""GPTQ onto any ``WeightGrid``: the loop of ``algorithms.gptq`` with the grid's own rounding.

Column by column, with lazy block updates of width ``block_size`` (a multiple of the group
size): each column is encoded onto the grid, decoded, and its error pushed onto the columns not
yet quantized through the upper Cholesky factor of (H + lambda I)^-1. Tensor-level parameters
(``prepare``) come from the original weight with sensitivity diag(H) - SqueezeLLM's tables
included; per-group parameters are fitted when the loop reaches the group, on the updated
weights; whole-row grids are fitted up front. No act-order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.algorithms.gptq import _damped_inverse_cholesky
from lowbit.algorithms.rtn import hessian_loss
from lowbit.formats.grid_base import Params, WeightGrid, check_finite
from lowbit.formats.grids import group_slices


def gptq_grid(
    w: Tensor, h: Tensor, grid: WeightGrid, block_size: int = 128, damp: float = 0.01
) -> tuple[Tensor, list[Params], Tensor, float]:
    """Quantize an (out, in) weight given its input Hessian (in, in).

    Returns (codes (out, in), parameters per group, w_hat as the grid decodes it, the loss
    mean_r dW_r H dW_r^T against the undamped H).
    """
    check_finite(w)
    check_finite(h, "Hessian")
    w0 = w.detach().float()
    W = w0.clone()
    H = h.detach().float().clone()
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected ({in_f}, {in_f})")
    grid.check(out_f, in_f)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    hdiag = torch.diag(H)

    ctx = grid.prepare(W, hdiag)
    gs = grid.group_size
    n_groups = len(group_slices(grid, in_f))
    params: list[Params | None] = [None] * n_groups
    if gs is None:
        params[0] = grid.fit(W, hdiag, ctx=ctx, group=0)
        gs = in_f
        bs = block_size
    else:
        bs = gs * max(1, block_size // gs)

    U, _ = _damped_inverse_cholesky(H, damp)
    code_cols: list[Tensor] = []
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // gs
            if params[g] is None:  # first column of a group: always inside this block
                params[g] = grid.fit(W1[:, i : i + gs], hdiag[col : col + gs], ctx=ctx, group=g)
            p = params[g]
            q = grid.encode(W1[:, i : i + 1], p)
            code_cols.append(q)
            err = (W1[:, i] - grid.decode(q, p)[:, 0]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    final = grid.finalize([p for p in params if p is not None])
    codes = torch.cat(code_cols, 1)
    slices = group_slices(grid, in_f)
    w_hat = torch.cat(
        [grid.decode(codes[:, sl], p) for sl, p in zip(slices, final, strict=True)], 1
    )
    loss = hessian_loss(w_hat - w0, h.detach().float())
    return codes, final, w_hat, loss
