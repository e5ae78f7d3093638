"""Runtime modules for weight-only quantized Linears: packed codes dequantized on the fly
(``QuantLinear`` for integer schemes, ``GridLinear`` for any other grid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.gridweight import GridWeight
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Scheme


class QuantLinear(nn.Module):
    """y = x W_hat^T + b with W_hat rebuilt from packed codes at each call (or cached)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, cache: bool = False):
        super().__init__()
        self.scheme: Scheme = qw.scheme
        self.out_features, self.in_features = qw.shape
        for k, v in qw.to_tensors().items():
            self.register_buffer(k, v)
        if "g_idx" not in self._buffers:
            self.g_idx = None
        if "zeros" not in self._buffers:
            self.zeros = None
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.cache = cache
        self._w: torch.Tensor | None = None

    def quantized_weight(self) -> QuantizedWeight:
        t = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            t["zeros"] = self.zeros
        if self.g_idx is not None:
            t["g_idx"] = self.g_idx
        return QuantizedWeight.from_tensors(self.scheme, (self.out_features, self.in_features), t)

    def weight_hat(self) -> torch.Tensor:
        if self._w is not None:
            return self._w
        w = self.quantized_weight().dequantize()
        if self.cache:
            self._w = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            x, self.weight_hat().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.name}"


class GridLinear(nn.Module):
    """y = x W_hat^T + b for a weight on a ``WeightGrid``: the stored tensors are buffers and
    W_hat = ``GridWeight.dequantize()`` is rebuilt at each call (or cached)."""

    def __init__(self, gw: GridWeight, bias: torch.Tensor | None = None, cache: bool = False):
        super().__init__()
        self.grid = gw.grid
        self.code_dtype: str = gw.describe()["code_dtype"]
        self.out_features, self.in_features = gw.shape
        stored = gw.to_tensors()
        self._names = list(stored)
        for k, v in stored.items():
            self.register_buffer(k, v)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.cache = cache
        self._w: torch.Tensor | None = None

    def grid_weight(self) -> GridWeight:
        t = {k: getattr(self, k) for k in self._names}
        shape = (self.out_features, self.in_features)
        return GridWeight.from_tensors(self.grid, shape, t, self.code_dtype)

    def weight_hat(self) -> torch.Tensor:
        if self._w is not None:
            return self._w
        w = self.grid_weight().dequantize()
        if self.cache:
            self._w = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            x, self.weight_hat().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, grid={self.grid.name}"
