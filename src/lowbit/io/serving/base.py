"""The protocol every serving format implements, and what the formats share about weights.

A serving format (``compressed_tensors``, ``gptq``, ``awq``: one module each, registered in
``lowbit.io.serving.checkpoint.FORMATS``) provides:

- ``name`` - the ``--format`` name; ``quant_method`` - config.json's
  ``quantization_config.quant_method``, which identifies a checkpoint of the format;
- ``check(name, w)`` - raise a LowbitError (naming the Linear) when the weight cannot be
  written in the format;
- ``quantization_config(weights, ignore)`` - config.json's ``quantization_config`` for the
  weights by full module name; ``ignore``: the Linears left unquantized;
- ``layer_tensors(name, w)`` - the checkpoint tensors of one quantized Linear (full keys);
- ``read_layers(tensors, qcfg)`` - the quantized Linears of a checkpoint (their tensors are
  popped from ``tensors``);
- ``extra_files(qcfg)`` - files written beside config.json (file name -> text).

A weight ``w`` is a ``GridWeight`` (weight-only formats), or a ``W8A8Linear`` runtime module
(int8 weights and activations).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import WeightGrid
from lowbit.formats.integer import SCALE_DTYPES, IntGrid
from lowbit.formats.weight import GridWeight

# the W8A8 "scheme" names a W8A8Linear exports as, by its activation mode
W8A8_SCHEMES = {"w8a8": "dynamic", "w8a8-static": "static"}


class ServingFormat(Protocol):
    name: str
    quant_method: str
    mixed: bool  # holds several schemes in one checkpoint (one config group per scheme)

    def check(self, name: str, w: Any) -> None: ...

    def quantization_config(self, weights: dict[str, Any], ignore: list[str]) -> dict: ...

    def layer_tensors(self, name: str, w: Any) -> dict[str, torch.Tensor]: ...

    def read_layers(self, tensors: dict[str, torch.Tensor], qcfg: dict) -> dict[str, Any]: ...

    def extra_files(self, qcfg: dict) -> dict[str, str]: ...


def is_w8a8(w: Any) -> bool:
    """A W8A8 runtime module (int8 ``W8A8Linear`` or ``FP8Linear``), written as itself."""
    from lowbit.runtime.fp8 import FP8Linear
    from lowbit.runtime.w8a8 import W8A8Linear

    return isinstance(w, W8A8Linear | FP8Linear)


def int_weight(w: Any) -> GridWeight | None:
    """``w`` when it is an integer (IntGrid) weight, else None."""
    return w if isinstance(w, GridWeight) and isinstance(w.grid, IntGrid) else None


def scheme_of(w: Any) -> WeightGrid | str:
    """What a weight was quantized to: a GridWeight's grid, a W8A8 module's scheme name."""
    if isinstance(w, GridWeight):
        return w.grid
    if is_w8a8(w):
        base = "w8a8-fp8" if hasattr(w, "fmt") else "w8a8"
        return base if w.act == "dynamic" else base + "-static"
    raise LowbitError(f"{type(w).__name__} layers have no serving checkpoint layout")


def scheme_name(scheme: WeightGrid | str) -> str:
    return scheme if isinstance(scheme, str) else scheme.name


def label(w: Any) -> str:
    """A weight's scheme name for messages (its type's name when it has none)."""
    try:
        return scheme_name(scheme_of(w))
    except LowbitError:
        return type(w).__name__


def stored_scale(gw: GridWeight) -> torch.Tensor:
    """An integer weight's scales (out, groups) in the grid's stored dtype (fp16 by default)."""
    return gw.params["scale"].to(SCALE_DTYPES[gw.grid.scale_dtype]).contiguous()


def column_groups(grid: IntGrid, in_features: int) -> torch.Tensor:
    """The group of every input column when the columns were not reordered (the default
    ``g_idx``): int32 (in,), all 0 unless the grid is grouped."""
    if grid.group_size is None:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // grid.group_size).to(torch.int32)


def first(weights: dict[str, Any]) -> Any:
    if not weights:
        raise LowbitError("the model has no quantized Linears to export")
    return next(iter(weights.values()))
