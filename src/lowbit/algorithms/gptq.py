"""GPTQ (Frantar et al., 2022): column-by-column rounding with inverse-Hessian error feedback.

The weights of one Linear are quantized one input column at a time; the rounding error of a
column is pushed onto the columns not yet quantized through the upper Cholesky factor of
H^-1 (H = 2 X^T X / n from calibration inputs). Updates are applied lazily per block of
columns. Per-group parameters are fitted when the algorithm reaches the group, on the
already-updated weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowbit.algorithms.rtn import SCALE_TORCH, hessian_loss, rtn_quantize
from lowbit.formats.integer import column_groups, fit_qparams, fit_weight, quantize
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Scheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    # quantize columns by decreasing H diagonal; None = the default, on (see BENCHMARKS.md)
    act_order: bool | None = None
    static_groups: bool = False  # with act_order: fit group parameters before reordering


def _damped_inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1, raising lambda until H is positive definite."""
    mean_diag = float(torch.diag(h).mean())
    lam = damp * mean_diag
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(8):
        l_factor, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l_factor)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u, lam
        new = max(lam * 10, 1e-8 * max(mean_diag, 1e-8))
        log.warning("Cholesky failed with damping %.3g; retrying with %.3g", lam, new)
        lam = new
    raise RuntimeError("Hessian is not positive definite even after heavy damping")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: Scheme,
    cfg: GPTQConfig = GPTQConfig(),
    losses: bool = True,
) -> tuple[QuantizedWeight, dict]:
    """Quantize an (out, in) weight given its input Hessian (in, in). Returns the weight and
    stats: the damping used and (``losses``) the layer loss of GPTQ and of RTN on the same H.

    Rows are independent given H, so Linears that share an input can be stacked into one
    call (``QuantizedWeight.split_rows`` takes them apart)."""
    w0 = w.detach().float()
    W = w0.clone()
    H = h.detach().float().clone()
    out_f, in_f = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    grouped = scheme.granularity == "group"
    gs = scheme.group_size if grouped else in_f
    if grouped:
        scheme.groups(in_f)  # validates divisibility
    act_order = cfg.act_order is not False
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None

    # parameters fitted up front: channel / tensor granularity, or static groups
    pre_scale = pre_zero = None
    if not grouped or (cfg.static_groups and perm is not None):
        pre_scale, pre_zero = fit_weight(W, scheme, torch.diag(H))
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]

    U, lam = _damped_inverse_cholesky(H, cfg.damp)
    col_group = column_groups(in_f, scheme).long()
    if perm is not None and pre_scale is not None:
        col_group = col_group[perm]  # static groups: each column keeps its original group

    n_groups = in_f // gs
    scale = torch.empty(out_f, n_groups) if pre_scale is None else pre_scale
    zero = torch.empty(out_f, n_groups) if pre_zero is None else pre_zero
    Q = torch.zeros_like(W)
    bs = gs * max(1, cfg.block_size // gs) if grouped else cfg.block_size
    hdiag = torch.diag(H)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if pre_scale is None and col % gs == 0:
                s, z = fit_qparams(W1[:, i : i + gs], scheme, hdiag[col : col + gs])
                scale[:, col // gs], zero[:, col // gs] = s[:, 0], z[:, 0]
            g = col_group[col]
            q = quantize(W1[:, i], scale[:, g], zero[:, g], scheme.bits)
            Q[:, col] = q
            deq = scale[:, g] * (q - zero[:, g])
            err = (W1[:, i] - deq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if pre_scale is None:
            g_idx = col_group[inv].to(torch.int32)  # group = position in quantization order // gs
    qw = QuantizedWeight(
        scheme,
        Q.to(torch.uint8),
        scale.to(SCALE_TORCH[scheme.scale_dtype]),
        zero.to(torch.uint8),
        g_idx,
    )
    if not losses:
        return qw, {"damp": lam}
    return qw, {**layer_losses(w0, qw, h, scheme), "damp": lam}


def layer_losses(w: torch.Tensor, qw: QuantizedWeight, h: torch.Tensor, scheme: Scheme) -> dict:
    """Layer-output loss of ``qw`` and of plain RTN of ``w`` on the same Hessian."""
    w0, h0 = w.detach().float(), h.detach().float()
    loss = hessian_loss(qw.dequantize() - w0, h0)
    rtn_loss = hessian_loss(rtn_quantize(w0, scheme).dequantize() - w0, h0)
    return {"loss": loss, "rtn_loss": rtn_loss}
