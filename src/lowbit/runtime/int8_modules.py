"""Rebuild an int8 or FP8 W8A8 runtime module from the layer description and tensors a saved model
holds (``lowbit.io.native``)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime.int8_mixed import Int8MixedLinear
from lowbit.runtime.w8a8 import W8A8Linear


def int8_module(info: dict, parts: dict[str, torch.Tensor], bias: torch.Tensor | None,
                kernel: str | None = None) -> nn.Module:
    kind = info["kind"]
    k = kernel or info.get("kernel", "auto")
    try:
        if kind == "w8a8":
            xs = parts["x_scale"] if info["act"] == "static" else None
            return W8A8Linear(parts["qweight"], parts["w_scale"], bias, info["act"], xs, k)
        if kind == "w8a8-fp8":
            from lowbit.runtime.fp8 import FP8Linear

            xs = float(parts["x_scale"]) if info["act"] == "static" else None
            return FP8Linear(parts["qweight"], parts["w_scale"], bias, info["act"], xs,
                             info.get("fmt", "e4m3"), kernel or info.get("kernel", "scaled_mm"))
        if kind == "llm-int8":
            return Int8MixedLinear(parts["qweight"], parts["w_scale"], bias, info["threshold"], k)
    except KeyError as e:
        raise LowbitError(f"saved {kind} layer lacks {e}") from None
    raise LowbitError(f"unknown layer kind {kind!r} in lowbit.json")
