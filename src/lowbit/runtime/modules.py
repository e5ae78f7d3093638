"""Rebuild a runtime module from the layer record and tensors a saved model holds
(``lowbit.io.native``): ``QLinear`` for grid weights, the int8 / FP8 modules by ``kind``."""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.grids import grid_from_info
from lowbit.formats.weight import GridWeight
from lowbit.runtime.qlinear import QLinear, QuantModule


def build_module(info: dict, parts: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 cache: bool = False, kernel: str | None = None) -> QuantModule:
    """A runtime module from a layer record (``shape`` and ``grid``, or ``kind``)."""
    kind = info.get("kind")
    if kind is None:
        gw = GridWeight.from_tensors(grid_from_info(info), tuple(info["shape"]), parts)
        q = QLinear(gw, bias, cache=cache)
        q.set_rotations(info)
        return q
    if "input_rotation" in info or "output_rotation" in info:
        raise LowbitError(f"a {kind} layer with a rotation: only grid weights take one")
    k = kernel or info.get("kernel", "auto")
    try:
        if kind == "w8a8":
            from lowbit.runtime.w8a8 import W8A8Linear

            xs = parts["x_scale"] if info["act"] == "static" else None
            return W8A8Linear(parts["qweight"], parts["w_scale"], bias, info["act"], xs, k)
        if kind == "w8a8-fp8":
            from lowbit.runtime.fp8 import FP8Linear

            xs = float(parts["x_scale"]) if info["act"] == "static" else None
            return FP8Linear(parts["qweight"], parts["w_scale"], bias, info["act"], xs,
                             info.get("fmt", "e4m3"), kernel or info.get("kernel", "scaled_mm"))
        if kind == "llm-int8":
            from lowbit.runtime.int8_mixed import Int8MixedLinear

            return Int8MixedLinear(parts["qweight"], parts["w_scale"], bias, info["threshold"], k)
    except KeyError as e:
        raise LowbitError(f"saved {kind} layer lacks {e}") from None
    raise LowbitError(f"unknown layer kind {kind!r} in lowbit.json")
