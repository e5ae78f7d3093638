"""lowbit integer weights <-> the GPTQ checkpoint layout (AutoGPTQ / GPTQModel / optimum,
vLLM's gptq and gptq_marlin, transformers through GPTQModel).

Per quantized Linear ``name`` (out, in), b in {2, 4, 8}, p = 32 / b codes per int32 word:

- ``name.qweight`` int32 (in / p, out): word [i, j] holds the codes of input rows
  i*p .. i*p+p-1 of output column j, row i*p+k in bits [k*b, (k+1)*b) (packed along the INPUT
  dim).
- ``name.qzeros`` int32 (groups, out / p): zero points packed along the OUTPUT dim, same bit
  order. Written in the historical v1 convention (``checkpoint_format: "gptq"``): the stored
  value is zero - 1. GPTQModel converts v1 to its internal v2 by adding 1 on load and vLLM's
  gptq kernels add 1 when dequantizing; ``checkpoint_format: "gptq_v2"`` files store zero as is
  (lowbit reads both). A zero point of 0 has no v1 encoding, so such weights are refused.
- ``name.scales`` fp16 (groups, out); ``name.g_idx`` int32 (in,), the group of each input
  column (act-order: not monotone; then ``desc_act: true``).
- W_hat[:, c] = scales[g_idx[c]] * (code[c] - zero[g_idx[c]]).

config.json's ``quantization_config`` (and a ``quantize_config.json`` for older loaders)
carries ``quant_method: "gptq"``, ``bits``, ``group_size`` (-1 for per-channel), ``sym``,
``desc_act`` and ``checkpoint_format``.

Reading builds ``GridWeight(IntGrid(bits, ..., scale_dtype="float16"), codes, {"scale",
"zero"}, g_idx)``; ``g_idx`` is kept only when it is not the natural column order.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from lowbit.errors import LowbitError
from lowbit.formats.integer import IntGrid
from lowbit.formats.weight import GridWeight
from lowbit.io.serving.base import column_groups, first, int_weight, label, stored_scale

name = "gptq"
quant_method = "gptq"
mixed = False
BITS = (2, 4, 8)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, m) small unsigned ints -> (n / p, m) int32, row k of each run of p at bits k*b."""
    p = 32 // bits
    n, m = codes.shape
    c = codes.to(torch.int64).reshape(n // p, p, m)
    shifts = (torch.arange(p, dtype=torch.int64) * bits)[None, :, None]
    words = (c << shifts).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: (n / p, m) int32 -> (n, m) uint8."""
    p = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(p, dtype=torch.int64) * bits)[None, :, None]
    c = (w[:, None, :] >> shifts) & ((1 << bits) - 1)
    return c.reshape(-1, words.shape[1]).to(torch.uint8)


def check(name: str, w) -> None:
    gw = int_weight(w)
    if gw is None or gw.grid.bits not in BITS:
        what = f"{gw.grid.bits}-bit" if gw is not None else label(w)
        raise LowbitError(
            f"{name}: GPTQ layout holds 2, 4 or 8-bit integer weights, not {what}; "
            "compressed-tensors holds 2..8-bit integers, GGUF (--format gguf) re-encodes any model"
        )
    out_f, in_f = gw.shape
    p = 32 // gw.grid.bits
    if in_f % p or out_f % p:
        raise LowbitError(f"{name}: GPTQ packing needs both dims divisible by {p}, not {gw.shape}")
    if gw.grid.scale_dtype != "float16":
        raise LowbitError(f"{name}: GPTQ layout stores fp16 scales; quantize with fp16 scales")
    if not gw.grid.symmetric and bool((gw.params["zero"] == 0).any()):
        raise LowbitError(
            f"{name}: a zero point of 0 has no encoding in GPTQ v1 (stored as zero - 1); "
            "export as awq or compressed-tensors"
        )


def layer_tensors(name: str, gw: GridWeight) -> dict[str, torch.Tensor]:
    check(name, gw)
    b = gw.grid.bits
    g_idx = gw.g_idx if gw.g_idx is not None else column_groups(gw.grid, gw.shape[1])
    zero_v1 = gw.params["zero"].to(torch.int16).T - 1  # (groups, out)
    return {
        f"{name}.qweight": pack_rows(gw.codes.T.contiguous(), b),
        f"{name}.qzeros": pack_rows(zero_v1.T.contiguous(), b).T.contiguous(),
        f"{name}.scales": stored_scale(gw).T.contiguous(),
        f"{name}.g_idx": g_idx.to(torch.int32).contiguous(),
    }


def quantization_config(weights: dict[str, GridWeight], ignore: list[str]) -> dict:
    """GPTQ's config (its loaders quantize every Linear of the blocks: ``ignore`` is implied)."""
    grid = first(weights).grid
    return {
        "quant_method": "gptq",
        "bits": grid.bits,
        "group_size": grid.group_size or -1,
        "sym": grid.symmetric,
        "desc_act": any(w.g_idx is not None for w in weights.values()),
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
    }


def extra_files(qcfg: dict) -> dict[str, str]:
    """``quantize_config.json`` for older loaders (AutoGPTQ)."""
    return {"quantize_config.json": json.dumps(qcfg, indent=2) + "\n"}


def read_layer(name: str, t: dict[str, torch.Tensor], qcfg: dict) -> GridWeight:
    bits = int(qcfg["bits"])
    if bits not in BITS:
        raise LowbitError(f"{name}: GPTQ {bits}-bit import is not supported (2, 4, 8)")
    codes = unpack_rows(t["qweight"], bits).T.contiguous()  # (out, in)
    out_f, in_f = codes.shape
    zero = unpack_rows(t["qzeros"].T.contiguous(), bits).T.to(torch.int16)  # (groups, out)
    if qcfg.get("checkpoint_format", "gptq") == "gptq":
        zero = (zero + 1) & ((1 << bits) - 1)
    scale = t["scales"].T.contiguous().to(torch.float16)
    n_groups = scale.shape[1]
    gs = int(qcfg.get("group_size", -1))
    gran = "group" if gs > 0 and n_groups > 1 else "channel"
    grid = IntGrid(bits=bits, granularity=gran, group=gs if gran == "group" else 0,
                   symmetric=bool(qcfg.get("sym", True)), scale_dtype="float16")
    zero = zero.T.contiguous()
    if grid.symmetric and not bool((zero == 1 << (bits - 1)).all()):
        grid = replace(grid, symmetric=False)
    g_idx = t.get("g_idx")
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32)
        if gran == "channel" or torch.equal(g_idx, column_groups(grid, in_f)):
            g_idx = None
    return GridWeight(grid, codes, {"scale": scale.float(), "zero": zero.float()}, g_idx)


def read_layers(tensors: dict[str, torch.Tensor], qcfg: dict) -> dict[str, GridWeight]:
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    out = {}
    for n in names:
        parts = {s: tensors.pop(f"{n}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")
                 if f"{n}.{s}" in tensors}
        out[n] = read_layer(n, parts, qcfg)
    return out
