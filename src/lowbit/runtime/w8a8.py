"""W8A8 runtime: int8 weights (per output channel) times int8 activations (dynamic per token,
or static per tensor), accumulated in int32 and rescaled: y = (x_q W_q^T) * s_x * s_w + b."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime.int8 import (
    Int8Weight,
    quantize_static_int8,
    quantize_tokens_int8,
    quantize_weight_int8,
)
from lowbit.runtime.qlinear import QuantModule

ACT_MODES = ("dynamic", "static")


class W8A8Linear(QuantModule):
    """A Linear computed with a real int8 x int8 product (see ``lowbit.runtime.int8``)."""

    def __init__(
        self,
        qweight: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        act: str = "dynamic",
        x_scale: float | torch.Tensor | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if act not in ACT_MODES:
            raise LowbitError(f"activation quantization must be dynamic or static, not {act!r}")
        if act == "static" and x_scale is None:
            raise LowbitError("static activation quantization needs a calibrated scale")
        self.out_features, self.in_features = qweight.shape
        self.act = act
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.detach().float().reshape(-1).clone())
        xs = torch.tensor(0.0 if x_scale is None else float(x_scale), dtype=torch.float32)
        self.register_buffer("x_scale", xs.reshape(1))
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                   requires_grad=False)
        )
        self.kernel = kernel
        self._w: Int8Weight | None = None

    @classmethod
    def from_linear(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        act: str = "dynamic",
        x_absmax: float | None = None,
        weight_qmax: int = 127,
        kernel: str = "auto",
    ) -> W8A8Linear:
        """Quantize an (out, in) fp weight; ``x_absmax`` (static mode) is the calibrated input
        range the per-tensor activation scale covers."""
        q, s = quantize_weight_int8(weight, weight_qmax)
        xs = None if x_absmax is None else max(float(x_absmax), 1e-12) / 127.0
        return cls(q, s, bias, act, xs, kernel)

    def int8_weight(self) -> Int8Weight:
        if self._w is None or self._w.wq is not self.qweight:
            self._w = Int8Weight(self.qweight, self.kernel)
        return self._w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.act == "dynamic":
            xq, sx = quantize_tokens_int8(x2)
            y = self.int8_weight().matmul(xq, self.w_scale).mul_(sx[:, None])
        else:
            xq = quantize_static_int8(x2, float(self.x_scale))
            y = self.int8_weight().matmul(xq, self.x_scale * self.w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization in fp32: dequantized activations times dequantized weights."""
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.act == "dynamic":
            xq, sx = quantize_tokens_int8(x2)
            xd = xq.float() * sx[:, None]
        else:
            xd = quantize_static_int8(x2, float(self.x_scale)).float() * self.x_scale
        wd = self.qweight.float() * self.w_scale[:, None]
        y = xd @ wd.T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.w_scale[:, None]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "w_scale": self.w_scale, "x_scale": self.x_scale}

    def layer_info(self) -> dict:
        return {"kind": "w8a8", "shape": [self.out_features, self.in_features], "act": self.act,
                "kernel": self.kernel}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, act={self.act}, "
                f"kernel={self.kernel}")
