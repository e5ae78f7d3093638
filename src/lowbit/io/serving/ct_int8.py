"""W8A8 (SmoothQuant / naive W8A8) <-> compressed-tensors ``int-quantized``, the layout vLLM and
SGLang serve with int8 x int8 kernels; FP8 W8A8 (``w8a8-fp8``, the ``FP8_DYNAMIC`` / ``FP8``
presets) <-> ``float-quantized`` with FP8 input activations, served with FP8 kernels.

Per Linear ``name``: ``name.weight`` int8 (out, in) = lowbit's codes, ``name.weight_scale``
fp32 (out, 1); static per-tensor activations add ``name.input_scale`` fp32 (1,). The config
group has int8 symmetric channel weights and int8 symmetric activations, ``token`` +
``dynamic`` (per-token scales computed at run time) or ``tensor`` + static. SmoothQuant's
smoothing factors are already folded into the norms written beside them. The weights are
written by the library's ``IntQuantizationCompressor``; it dequantizes ``q * scale`` in fp32
like lowbit, so the weights agree bit for bit. FP8: ``name.weight`` float8_e4m3fn (lowbit's
codes), ``name.weight_scale`` fp32 (out, 1), activations float8 ``token``/dynamic or
``tensor``/static with ``name.input_scale``; written by ``FloatQuantizationCompressor``.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.fp8 import FP8Linear
from lowbit.runtime.w8a8 import W8A8Linear

FORMAT = "int-quantized"
FP8_FORMAT = "float-quantized"


def format_of(mod: W8A8Linear | FP8Linear) -> str:
    return FP8_FORMAT if isinstance(mod, FP8Linear) else FORMAT


def quant_args(act: str, kind: str = "int"):
    """(weight args, input activation args) for activations ``act`` (dynamic or static) of
    type ``kind`` (int or float)."""
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="channel",
                               dynamic=False)
    dynamic = act == "dynamic"
    acts = QuantizationArgs(num_bits=8, type=kind, symmetric=True, dynamic=dynamic,
                            strategy="token" if dynamic else "tensor")
    return weights, acts


def layer_tensors(name: str, mod: W8A8Linear | FP8Linear) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.naive_quantized.base import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationScheme

    fp8 = isinstance(mod, FP8Linear)
    if fp8 and mod.fmt != "e4m3":
        raise LowbitError(f"{name}: compressed-tensors/vLLM serve FP8 as E4M3 only, not {mod.fmt}")
    w_args, a_args = quant_args(mod.act, "float" if fp8 else "int")
    qs = QuantizationScheme(targets=["Linear"], weights=w_args, input_activations=a_args)
    scale = mod.w_scale.reshape(-1, 1).float().contiguous()
    comp = FloatQuantizationCompressor if fp8 else IntQuantizationCompressor
    out = comp.compress({"weight": mod.dequantized_weight(), "weight_scale": scale}, qs)
    same = (torch.equal(out["weight"].view(torch.uint8), mod.qweight.view(torch.uint8)) if fp8
            else torch.equal(out["weight"], mod.qweight))
    if not same:
        raise LowbitError(f"{name}: compressed-tensors W8A8 compression changed the codes")
    res = {f"{name}.weight": out["weight"].contiguous(), f"{name}.weight_scale": scale}
    if mod.act == "static":
        res[f"{name}.input_scale"] = mod.x_scale.reshape(1).float().clone()
    return res


# weight / activation type -> (stored weight dtype, runtime module)
_KINDS = {"int": (torch.int8, W8A8Linear), "float": (torch.float8_e4m3fn, FP8Linear)}


def read_layer(name: str, t: dict[str, torch.Tensor], weights: dict,
               acts: dict) -> W8A8Linear | FP8Linear:
    """One W8A8 Linear: int8 (``int-quantized``) or FP8 E4M3 (``float-quantized`` with FP8
    activations), symmetric per-channel weights, dynamic per-token or static per-tensor
    activations."""
    kind = weights.get("type")
    if kind not in _KINDS or int(weights.get("num_bits", 0)) != 8 or \
            weights.get("strategy") != "channel" or not weights.get("symmetric", True):
        raise LowbitError(f"{name}: W8A8 import takes int8 or FP8 symmetric per-channel "
                          f"weights, not {weights}")
    if int(acts.get("num_bits", 0)) != 8 or acts.get("type") != kind or \
            not acts.get("symmetric", True):
        raise LowbitError(f"{name}: W8A8 import takes 8-bit symmetric {kind} activations")
    dtype, cls = _KINDS[kind]
    w = t["weight"]
    if w.dtype != dtype:
        raise LowbitError(f"{name}: W8A8 weight stored as {w.dtype}, expected {dtype}")
    scale = t["weight_scale"].float().reshape(-1)
    if acts.get("dynamic") and acts.get("strategy") == "token":
        return cls(w, scale, act="dynamic")
    if not acts.get("dynamic") and acts.get("strategy") == "tensor" and "input_scale" in t:
        x = t["input_scale"].float().reshape(1)
        return cls(w, scale, act="static", x_scale=float(x) if kind == "float" else x)
    raise LowbitError(f"{name}: activations {acts.get('strategy')}/"
                      f"{'dynamic' if acts.get('dynamic') else 'static'} are not supported; "
                      "lowbit reads dynamic per-token or static per-tensor")
