"""The Python API: quantize a loaded model with a method and scheme, calibrating if needed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.arch import ArchSpec, block_linears, get_blocks, spec_for
from lowbit.errors import LowbitError
from lowbit.pipeline.driver import get_weight, run_sequential, set_weight
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Scheme, parse_scheme

METHODS = ("rtn", "gptq")
CALIBRATED = {"gptq"}


@dataclass
class QuantizeResult:
    method: str
    scheme: Scheme
    qweights: dict[str, QuantizedWeight]
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def bits_per_weight(self) -> float:
        n = sum(q.shape[0] * q.shape[1] for q in self.qweights.values())
        bits = sum(q.bits_per_weight() * q.shape[0] * q.shape[1] for q in self.qweights.values())
        return bits / max(n, 1)

    def storage_bytes(self) -> int:
        return sum(q.storage_bytes() for q in self.qweights.values())


def preflight(model: nn.Module, scheme: Scheme) -> ArchSpec:
    """Check family and shapes in seconds, before any long run."""
    spec = spec_for(model)
    blocks = get_blocks(model, spec)
    for name, mod in block_linears(blocks[0], spec).items():
        in_f = get_weight(mod, spec).shape[1]
        try:
            scheme.groups(in_f)
        except LowbitError as e:
            raise LowbitError(f"{name}: {e}") from None
    return spec


def quantize_model(
    model: nn.Module,
    method: str = "gptq",
    scheme: Scheme | str = "w4g64",
    calib: torch.Tensor | None = None,
    gptq: GPTQConfig = GPTQConfig(),
    chunk: int = 8,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    token_weight: str = "none",
) -> QuantizeResult:
    """Quantize every decoder-block Linear in place (the model keeps the dequantized weights,
    so it evaluates as the quantized model) and return the quantized tensors."""
    if isinstance(scheme, str):
        scheme = parse_scheme(scheme)
    if method not in METHODS:
        raise LowbitError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    spec = preflight(model, scheme)
    if method in CALIBRATED and calib is None:
        raise LowbitError(f"{method} needs calibration windows")
    res = QuantizeResult(method, scheme, {})
    rows = res.rows

    def emit(row: dict) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    t0 = time.perf_counter()
    if method == "rtn":
        blocks = get_blocks(model, spec)
        for bi, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            for name, mod in block_linears(block, spec).items():
                t1 = time.perf_counter()
                qw = rtn_quantize(get_weight(mod, spec), scheme)
                set_weight(mod, spec, qw.dequantize())
                full = f"{spec.blocks}.{bi}.{name}"
                res.qweights[full] = qw
                emit(
                    {
                        "block": bi,
                        "name": full,
                        "shape": list(qw.shape),
                        "tokens": 0,
                        "seconds": round(time.perf_counter() - t1, 3),
                    }
                )
    else:

        def group_fn(bi: int, modules: dict, stats: dict) -> dict:
            out = {}
            for name, mod in modules.items():
                t1 = time.perf_counter()
                qw, info = gptq_quantize(get_weight(mod, spec), stats[name].h, scheme, gptq)
                set_weight(mod, spec, qw.dequantize())
                res.qweights[f"{spec.blocks}.{bi}.{name}"] = qw
                out[name] = info | {"seconds": round(time.perf_counter() - t1, 3)}
            return out

        run_sequential(model, spec, calib, group_fn, chunk=chunk, progress=progress, on_row=emit,
                       token_weight=token_weight)
    res.seconds = time.perf_counter() - t0
    return res
