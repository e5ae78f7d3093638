"""LLM.int8() (Dettmers et al.): mixed-precision decomposition at inference.

The input columns (feature dimensions) in which any value of the current input exceeds the
threshold in magnitude go through a full-precision product with those weight columns; the
rest are quantized vector-wise (one int8 scale per token row of X, one per output row of W)
and multiplied in int8 with int32 accumulation. The two outputs are summed. The weight is
stored once, as int8 per output channel; its outlier columns are used dequantized (as
bitsandbytes does for inference), so only the activations keep full precision there.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime.int8 import Int8Weight, quantize_tokens_int8, quantize_weight_int8
from lowbit.runtime.qlinear import QuantModule


def mixed_int8_linear(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    threshold: float,
    int8: Int8Weight | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (rows, out) of a 2-D input, and the boolean mask of outlier input columns."""
    x2 = x2.float()
    cols = (x2.abs() > threshold).any(0)
    regular = x2.masked_fill(cols[None, :], 0.0) if bool(cols.any()) else x2
    xq, sx = quantize_tokens_int8(regular)
    w8 = int8 if int8 is not None else Int8Weight(qweight, "emulate")
    y = w8.matmul(xq, w_scale).mul_(sx[:, None])
    if bool(cols.any()):
        w_out = qweight[:, cols].float() * w_scale[:, None]
        y = y + x2[:, cols] @ w_out.T
    return y, cols


class Int8MixedLinear(QuantModule):
    """y = X_outlier W_outlier^T (fp32) + dequant(int8(X_rest) int8(W)^T) + b.

    Counts outlier columns per call (``outlier_fraction``) for reporting."""

    def __init__(
        self,
        qweight: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        threshold: float = 6.0,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if not threshold > 0:
            raise LowbitError(f"the outlier threshold must be positive, not {threshold}")
        self.out_features, self.in_features = qweight.shape
        self.threshold = float(threshold)
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.detach().float().reshape(-1).clone())
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                   requires_grad=False)
        )
        self.kernel = kernel
        self._w: Int8Weight | None = None
        self.reset_counts()

    @classmethod
    def from_linear(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, threshold: float = 6.0,
        kernel: str = "auto",
    ) -> Int8MixedLinear:
        q, s = quantize_weight_int8(weight, 127)
        return cls(q, s, bias, threshold, kernel)

    def reset_counts(self) -> None:
        self.calls = 0
        self.outlier_cols = 0
        self.ever_outlier = torch.zeros(self.in_features, dtype=torch.bool)

    @property
    def outlier_fraction(self) -> float:
        """Mean fraction of input columns routed to full precision per call."""
        return self.outlier_cols / max(self.calls * self.in_features, 1)

    def int8_weight(self) -> Int8Weight:
        if self._w is None or self._w.wq is not self.qweight:
            self._w = Int8Weight(self.qweight, self.kernel)
        return self._w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y, cols = mixed_int8_linear(
            x.reshape(-1, shape[-1]), self.qweight, self.w_scale, self.threshold,
            self.int8_weight(),
        )
        self.calls += 1
        self.outlier_cols += int(cols.sum())
        self.ever_outlier |= cols
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.w_scale[:, None]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "w_scale": self.w_scale}

    def layer_info(self) -> dict:
        return {"kind": "llm-int8", "shape": [self.out_features, self.in_features],
                "threshold": self.threshold, "kernel": self.kernel}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, threshold={self.threshold}, "
                f"kernel={self.kernel}")
