"""The Python API: quantize a loaded model with a method and scheme, calibrating if needed.

A scheme is an integer ``Scheme`` (``w4g64``, ``w3g64-asym`` ...: ``QuantizedWeight``, RTN and
GPTQ with act-order / static groups) or any other ``WeightGrid`` name (``nf4``, ``mxfp4``,
``sq4`` ...: ``GridWeight``, ``grids.rtn`` and ``gptq_grid``, no act-order).

SqueezeLLM tables (``sq3``, ``sq4``) are k-means weighted by the Hessian diagonal, so they need
calibration windows with either method: RTN then collects statistics with the sequential
driver and rounds with sensitivity diag(H). Without windows quantize_model raises rather than
fall back to unweighted k-means under the same name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize, layer_losses
from lowbit.algorithms.gptq_grid import gptq_grid
from lowbit.algorithms.rtn import hessian_loss, rtn_quantize
from lowbit.arch import ArchSpec, block_linears, get_blocks, spec_for
from lowbit.errors import LowbitError
from lowbit.formats import grids
from lowbit.formats.grid_base import WeightGrid
from lowbit.formats.grids_lut import IntGrid, SqueezeGrid
from lowbit.gridweight import GridWeight
from lowbit.pipeline.driver import get_weight, run_sequential, set_weight
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Scheme, parse_scheme

METHODS = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant", "w8a8", "llm-int8")
CALIBRATED = {"gptq", "awq", "awq+gptq", "smoothquant"}
AWQ_METHODS = {"awq": "rtn", "awq+gptq": "gptq"}  # AWQ's search, then this rounding

AnyScheme = Scheme | WeightGrid
AnyWeight = QuantizedWeight | GridWeight


@dataclass
class QuantizeResult:
    method: str
    scheme: AnyScheme
    qweights: dict[str, AnyWeight]
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def bits_per_weight(self) -> float:
        n = sum(q.shape[0] * q.shape[1] for q in self.qweights.values())
        bits = sum(q.bits_per_weight() * q.shape[0] * q.shape[1] for q in self.qweights.values())
        return bits / max(n, 1)

    def storage_bytes(self) -> int:
        return sum(q.storage_bytes() for q in self.qweights.values())


def resolve_scheme(scheme: AnyScheme | str) -> AnyScheme:
    """A ``Scheme`` for integer names (``w...``), else the ``WeightGrid`` of the name;
    LowbitError listing the known names for anything else."""
    if isinstance(scheme, IntGrid):
        return scheme.scheme
    if not isinstance(scheme, str):
        return scheme
    if re.fullmatch(r"w\d+.*", scheme.strip().lower()):
        return parse_scheme(scheme)
    return grids.get_grid(scheme)


def scheme_dict(scheme: AnyScheme) -> dict:
    """The scheme as lowbit.json records it (always with a ``name``)."""
    if isinstance(scheme, Scheme):
        return scheme.to_dict()
    return {"name": scheme.name, "grid": scheme.name, "code_bits": scheme.code_bits,
            "group_size": scheme.group_size}


def needs_sensitivity(scheme: AnyScheme) -> bool:
    """Grids whose RTN itself needs the Hessian diagonal (SqueezeLLM's weighted k-means)."""
    return isinstance(scheme, SqueezeGrid)


def needs_calibration(method: str, scheme: AnyScheme | str) -> bool:
    return method in CALIBRATED or needs_sensitivity(resolve_scheme(scheme))


def preflight(model: nn.Module, scheme: AnyScheme | str) -> ArchSpec:
    """Check family and shapes in seconds, before any long run."""
    scheme = resolve_scheme(scheme)
    spec = spec_for(model)
    blocks = get_blocks(model, spec)
    for name, mod in block_linears(blocks[0], spec).items():
        out_f, in_f = get_weight(mod, spec).shape
        try:
            if isinstance(scheme, Scheme):
                scheme.groups(in_f)
            else:
                scheme.check(out_f, in_f)
        except LowbitError as e:
            raise LowbitError(f"{name}: {e}") from None
    return spec


def quantize_model(
    model: nn.Module,
    method: str = "gptq",
    scheme: AnyScheme | str = "w4g64",
    calib: torch.Tensor | None = None,
    gptq: GPTQConfig = GPTQConfig(),
    chunk: int = 8,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    token_weight: str = "none",
    alpha: float | None = None,
    threshold: float = 6.0,
    kernel: str = "auto",
    awq: dict | None = None,
) -> QuantizeResult:
    """Quantize every decoder-block Linear in place (the model keeps the dequantized weights,
    so it evaluates as the quantized model) and return the quantized tensors.

    ``smoothquant``, ``w8a8`` and ``llm-int8`` replace the Linears by int8 runtime modules
    instead (``lowbit.methods.int8_methods``; ``alpha``, ``threshold``, ``kernel``); ``awq`` and
    ``awq+gptq`` fold AWQ's scales and clipping first (``lowbit.methods.awq``; options in
    ``awq``), then round with RTN or GPTQ."""
    if method not in METHODS:
        raise LowbitError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method in ("smoothquant", "w8a8", "llm-int8"):
        from lowbit.methods.int8_methods import quantize_int8

        return quantize_int8(model, method, str(scheme), calib, 0.5 if alpha is None else alpha,
                             threshold, kernel, chunk, progress)
    if alpha is not None:
        raise LowbitError(f"--alpha is for smoothquant; {method} does not take it")
    scheme = resolve_scheme(scheme)
    if method in AWQ_METHODS:
        from lowbit.methods.awq import awq_transform

        preflight(model, scheme)
        if calib is None:
            raise LowbitError(f"{method} needs calibration windows")
        t0 = time.perf_counter()
        awq_rows = awq_transform(model, spec_for(model), calib, scheme, chunk=chunk,
                                 progress=progress, **(awq or {}))
        res = quantize_model(model, AWQ_METHODS[method], scheme, calib, gptq, chunk, progress,
                             on_row, token_weight)
        res.method = method
        res.rows[:0] = [r | {"awq": True} for r in awq_rows]
        res.seconds = time.perf_counter() - t0
        return res
    spec = preflight(model, scheme)
    is_grid = not isinstance(scheme, Scheme)
    if is_grid and method == "gptq" and (gptq.act_order or gptq.static_groups):  # None: off
        raise LowbitError(f"act-order and static groups are for integer schemes, not {scheme.name}")
    if needs_calibration(method, scheme) and calib is None:
        why = " (SqueezeLLM's k-means is weighted by the Hessian diagonal)" if is_grid else ""
        raise LowbitError(f"{method} {scheme.name} needs calibration windows{why}")
    res = QuantizeResult(method, scheme, {})
    rows = res.rows

    def emit(row: dict) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    t0 = time.perf_counter()
    if method == "rtn" and not needs_sensitivity(scheme):
        blocks = get_blocks(model, spec)
        for bi, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            for name, mod in block_linears(block, spec).items():
                t1 = time.perf_counter()
                w = get_weight(mod, spec)
                if is_grid:
                    qw, info = _grid_rtn(w, scheme, None)
                else:
                    qw, info = rtn_quantize(w, scheme), {}
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
                        **info,
                    }
                )
    else:

        def gptq_group(bi: int, modules: dict, stats: dict) -> dict:
            """Linears that share an input share H (and act-order's g_idx): one GPTQ call."""
            t1 = time.perf_counter()
            names = list(modules)
            h = stats[names[0]].h
            ws = [get_weight(modules[n], spec) for n in names]
            qw, info = gptq_quantize(torch.cat(ws), h, scheme, gptq, losses=False)
            out = {}
            for name, w, q in zip(names, ws, qw.split_rows([w.shape[0] for w in ws]), strict=True):
                set_weight(modules[name], spec, q.dequantize())
                res.qweights[f"{spec.blocks}.{bi}.{name}"] = q
                out[name] = layer_losses(w, q, h, scheme) | info
            secs = round((time.perf_counter() - t1) / len(names), 3)
            return {n: r | {"seconds": secs} for n, r in out.items()}

        def grid_group(bi: int, modules: dict, stats: dict) -> dict:
            out = {}
            for name, mod in modules.items():
                t1 = time.perf_counter()
                w, h = get_weight(mod, spec), stats[name].h
                if method == "rtn":
                    qw, info = _grid_rtn(w, scheme, torch.diag(h))
                else:
                    qw, info = _grid_gptq(w, h, scheme, gptq)
                set_weight(mod, spec, qw.dequantize())
                res.qweights[f"{spec.blocks}.{bi}.{name}"] = qw
                out[name] = info | {"seconds": round(time.perf_counter() - t1, 3)}
            return out

        group_fn = grid_group if is_grid else gptq_group
        run_sequential(model, spec, calib, group_fn, chunk=chunk, progress=progress, on_row=emit,
                       token_weight=token_weight)
    res.seconds = time.perf_counter() - t0
    return res


def _grid_rtn(
    w: torch.Tensor, grid: WeightGrid, sensitivity: torch.Tensor | None
) -> tuple[GridWeight, dict]:
    codes, params, _ = grids.rtn(w, grid, sensitivity)
    gw = GridWeight(grid, codes, params)
    return gw, {"saturated": gw.saturated()}


def _grid_gptq(
    w: torch.Tensor, h: torch.Tensor, grid: WeightGrid, cfg: GPTQConfig
) -> tuple[GridWeight, dict]:
    """GPTQ onto the grid, with the loss of the grid's RTN (as ``--method rtn`` would round)
    on the same Hessian for comparison."""
    codes, params, _, loss = gptq_grid(w, h, grid, cfg.block_size, cfg.damp)
    gw = GridWeight(grid, codes, params)
    w0, h0 = w.detach().float(), h.detach().float()
    sens = torch.diag(h0) if needs_sensitivity(grid) else None
    _, _, r_hat = grids.rtn(w0, grid, sens)
    rtn_loss = hessian_loss(r_hat - w0, h0)
    return gw, {"loss": loss, "rtn_loss": rtn_loss, "saturated": gw.saturated()}
