"""Round-to-nearest: every weight to its nearest grid point, per-group parameters."""

from __future__ import annotations

import torch

from lowbit.formats.integer import column_groups, fit_weight, quantize
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Scheme

SCALE_TORCH = {"float16": torch.float16, "float32": torch.float32}


def rtn_quantize(
    w: torch.Tensor, scheme: Scheme, col_weight: torch.Tensor | None = None
) -> QuantizedWeight:
    """Quantize an (out, in) weight; ``col_weight`` weights the MSE clipping search."""
    w = w.detach().float()
    scale, zero = fit_weight(w, scheme, col_weight)
    g = column_groups(w.shape[1], scheme).long()
    q = quantize(w, scale[:, g], zero[:, g], scheme.bits)
    return QuantizedWeight(
        scheme, q.to(torch.uint8), scale.to(SCALE_TORCH[scheme.scale_dtype]), zero.to(torch.uint8)
    )


def hessian_loss(delta: torch.Tensor, h: torch.Tensor) -> float:
    """Mean over output rows of dW H dW^T: the layer-output error GPTQ minimises."""
    return float(((delta @ h) * delta).sum() / delta.shape[0])
