"""Serving checkpoints for vLLM, SGLang and transformers: compressed-tensors, GPTQ and AWQ
folders written from lowbit's quantized weights and read back into lowbit.

- ``write_checkpoint(out, fmt, model, tokenizer, weights, meta, ...)`` / ``read_checkpoint`` /
  ``load_checkpoint`` / ``quant_format`` (``checkpoint``);
- ``FORMATS``: name -> the format (``compressed_tensors``, ``gptq``, ``awq``), each a
  ``ServingFormat`` (``base``);
- ``quantized_weights(model)``: what a loaded lowbit model exports;
- ``check_target``: format capacity, kernel shapes and tensor-parallel splits on shapes only
  (``targets``); ``model_card`` writes README.md (``model_card``).
"""

from lowbit.io.serving.base import ServingFormat
from lowbit.io.serving.checkpoint import (
    FORMATS,
    check_weights,
    load_checkpoint,
    quant_format,
    quantized_weights,
    read_checkpoint,
    write_checkpoint,
)
from lowbit.io.serving.targets import Preflight, check_target, model_heads, model_shapes

__all__ = [
    "FORMATS", "Preflight", "ServingFormat", "check_target", "check_weights", "load_checkpoint",
    "model_heads", "model_shapes", "quant_format", "quantized_weights", "read_checkpoint",
    "write_checkpoint",
]
