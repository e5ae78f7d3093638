"""W8A8 (SmoothQuant / naive W8A8) <-> compressed-tensors ``int-quantized``, the layout vLLM and
SGLang serve with int8 x int8 kernels.

Per Linear ``name``: ``name.weight`` int8 (out, in) = lowbit's codes, ``name.weight_scale``
fp32 (out, 1); static per-tensor activations add ``name.input_scale`` fp32 (1,). The config
group has int8 symmetric channel weights and int8 symmetric activations, ``token`` +
``dynamic`` (per-token scales computed at run time) or ``tensor`` + static. SmoothQuant's
smoothing factors are already folded into the norms written beside them. The weights are
written by the library's ``IntQuantizationCompressor``; it dequantizes ``q * scale`` in fp32
like lowbit, so the weights agree bit for bit.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.w8a8 import W8A8Linear

FORMAT = "int-quantized"


def quant_args(act: str):
    """(weight args, input activation args) for activations ``act``: dynamic or static."""
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel",
                               dynamic=False)
    dynamic = act == "dynamic"
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=dynamic,
                            strategy="token" if dynamic else "tensor")
    return weights, acts


def layer_tensors(name: str, mod: W8A8Linear) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w_args, a_args = quant_args(mod.act)
    qs = QuantizationScheme(targets=["Linear"], weights=w_args, input_activations=a_args)
    scale = mod.w_scale.reshape(-1, 1).float().contiguous()
    out = IntQuantizationCompressor.compress(
        {"weight": mod.dequantized_weight(), "weight_scale": scale}, qs)
    if not torch.equal(out["weight"], mod.qweight):
        raise LowbitError(f"{name}: compressed-tensors int8 compression changed the codes")
    res = {f"{name}.weight": out["weight"].contiguous(), f"{name}.weight_scale": scale}
    if mod.act == "static":
        res[f"{name}.input_scale"] = mod.x_scale.reshape(1).float().clone()
    return res


def read_layer(name: str, t: dict[str, torch.Tensor], weights: dict, acts: dict) -> W8A8Linear:
    if weights.get("type") != "int" or int(weights.get("num_bits", 0)) != 8 or \
            weights.get("strategy") != "channel" or not weights.get("symmetric", True):
        raise LowbitError(f"{name}: int-quantized import takes int8 symmetric per-channel "
                          f"weights, not {weights}")
    if int(acts.get("num_bits", 0)) != 8 or acts.get("type") != "int" or \
            not acts.get("symmetric", True):
        raise LowbitError(f"{name}: int-quantized import takes int8 symmetric activations")
    w = t["weight"]
    if w.dtype != torch.int8:
        raise LowbitError(f"{name}: int-quantized weight stored as {w.dtype}, expected int8")
    scale = t["weight_scale"].float().reshape(-1)
    if acts.get("dynamic") and acts.get("strategy") == "token":
        return W8A8Linear(w, scale, act="dynamic")
    if not acts.get("dynamic") and acts.get("strategy") == "tensor" and "input_scale" in t:
        return W8A8Linear(w, scale, act="static", x_scale=t["input_scale"].float().reshape(1))
    raise LowbitError(f"{name}: activations {acts.get('strategy')}/"
                      f"{'dynamic' if acts.get('dynamic') else 'static'} are not supported; "
                      "lowbit reads dynamic per-token or static per-tensor int8")
