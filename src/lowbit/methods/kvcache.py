"""The KV-cache step: the format the model's keys and values are cached in when it runs, chosen
with the weights and recorded with them (``kv_cache`` in ``lowbit.json``).

The cache is not a Linear, so the step owns no layer: it runs once, after the last block, on
the quantized model. Integer formats (``kivi-*``, ``kvquant-*``, ``int8``) need nothing more
than their name; float8 ones (``fp8``, ``fp8-head``, ``-e5m2``) need static scales, the largest
|key| and |value| per layer (or per layer and KV head) seen on the recipe's calibration windows
run through the *quantized* model (the keys it will cache are those of the rounded weights), as
llm-compressor's ``kv_cache_scheme`` calibrates them. A compressed-tensors export writes them as
``kv_cache_scheme`` with ``self_attn.k_scale`` / ``v_scale`` (what vLLM reads); a GGUF model card
names the llama.cpp ``--cache-type-k/-v`` nearest to the format.

    steps:
      - gptq: {scheme: w4g64}
      - kv: {format: fp8}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lowbit.formats.kv import KVSpec, parse_kv
from lowbit.methods.base import Step, register

CALIB_WINDOWS = 32  # windows the scales are measured on at most (the first of the recipe's)


@register
@dataclass(frozen=True)
class KVCache(Step):
    step: ClassVar[str] = "kv"
    kind: ClassVar[str] = "cache"
    format: str = "fp8"

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_kv(self.format)  # a bad name fails when the recipe is read

    @property
    def spec(self) -> KVSpec:
        return parse_kv(self.format)

    def needs_data(self) -> bool:
        return self.spec.fp8 is not None

    def record(self, model: nn.Module, calib: Tensor | None) -> dict:
        """The ``kv_cache`` record of ``model`` (quantized already): the format's name and,
        for float8, the scales measured on ``calib``."""
        from lowbit.runtime.kvcache import calibrate_kv

        spec = self.spec
        out: dict = {"format": spec.name}
        if spec.fp8 is not None and calib is not None:
            out["scales"] = scales_to_data(calibrate_kv(model, spec, calib[:CALIB_WINDOWS]))
        return out


def scales_to_data(scales: list[tuple[Tensor, Tensor]]) -> list[list]:
    """Float8 scales per layer as JSON: ``[k, v]`` per layer, each a number (per layer) or a
    list (per KV head); fp32 values, exact through a float64 repr."""
    return [[s.float().tolist() for s in pair] for pair in scales]


def scales_from_data(data: list) -> list[tuple[Tensor, Tensor]]:
    return [(torch.tensor(k, dtype=torch.float32), torch.tensor(v, dtype=torch.float32))
            for k, v in data]
