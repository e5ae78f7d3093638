"""lowbit integer weights <-> the AWQ GEMM checkpoint layout (AutoAWQ ``version: "gemm"``,
vLLM's awq / awq_marlin, transformers through GPTQModel).

4-bit only. Per quantized Linear ``name`` (out, in), groups of g input columns:

- ``name.qweight`` int32 (in, out / 8): packed along the OUTPUT dim; word [i, j] holds output
  columns 8j .. 8j+7 of input row i, interleaved: nibble k (bits [4k, 4k+4)) holds column
  8j + ORDER[k] with ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (readers undo it with the inverse
  permutation [0, 4, 1, 5, 2, 6, 3, 7]).
- ``name.qzeros`` int32 (in / g, out / 8): zero points, same packing, stored as is (no -1).
- ``name.scales`` fp16 (in / g, out).
- W_hat[o, i] = scales[i // g, o] * (code - zero). AWQ always carries zero points: lowbit's
  symmetric weights are written with zero 8 (``zero_point: true`` in the config either way).

No g_idx: act-order weights cannot be written (export those as GPTQ).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.integer import IntGrid
from lowbit.formats.weight import GridWeight
from lowbit.io.serving.base import first, int_weight, label, stored_scale

name = "awq"
quant_method = "awq"
mixed = False
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_cols(x: torch.Tensor) -> torch.Tensor:
    """(n, m) 4-bit codes -> (n, m / 8) int32 in AWQ's interleaved nibble order."""
    n, m = x.shape
    c = x.to(torch.int64).reshape(n, m // 8, 8)[:, :, list(ORDER)]
    words = (c << (torch.arange(8, dtype=torch.int64) * 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_cols(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_cols``: (n, m / 8) int32 -> (n, m) uint8."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = (w[..., None] >> (torch.arange(8, dtype=torch.int64) * 4)) & 0xF  # nibble k
    return nib[..., list(REVERSE)].reshape(words.shape[0], -1).to(torch.uint8)


def check(name: str, w) -> None:
    gw = int_weight(w)
    if gw is None or gw.grid.bits != 4:
        what = f"{gw.grid.bits}-bit" if gw is not None else label(w)
        raise LowbitError(
            f"{name}: AWQ layout holds 4-bit integer weights only, not {what}; "
            "GPTQ holds 2/4/8-bit, compressed-tensors 2..8-bit integers, "
            "GGUF (--format gguf) re-encodes any model"
        )
    if gw.grid.granularity != "group":
        raise LowbitError(f"{name}: AWQ layout needs grouped scales (w4gN), not {gw.grid.name}")
    if gw.g_idx is not None:
        raise LowbitError(
            f"{name}: act-order weights (g_idx) cannot be written as AWQ; export as --format "
            "gptq, or quantize with --static-groups or --no-act-order"
        )
    if gw.shape[0] % 8:
        raise LowbitError(f"{name}: AWQ packing needs out_features divisible by 8, not {gw.shape}")
    if gw.grid.scale_dtype != "float16":
        raise LowbitError(f"{name}: AWQ layout stores fp16 scales; quantize with fp16 scales")


def layer_tensors(name: str, gw: GridWeight) -> dict[str, torch.Tensor]:
    check(name, gw)
    return {
        f"{name}.qweight": pack_cols(gw.codes.T.contiguous()),
        f"{name}.qzeros": pack_cols(gw.params["zero"].T.contiguous()),
        f"{name}.scales": stored_scale(gw).T.contiguous(),
    }


def quantization_config(weights: dict[str, GridWeight], ignore: list[str]) -> dict:
    """AWQ's config (``modules_to_not_convert`` stays null: its loaders convert the blocks'
    Linears only, so ``ignore`` (lm_head) is implied)."""
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": first(weights).grid.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def extra_files(qcfg: dict) -> dict[str, str]:
    return {}


def read_layer(name: str, t: dict[str, torch.Tensor], qcfg: dict) -> GridWeight:
    if int(qcfg.get("bits", 4)) != 4 or str(qcfg.get("version", "gemm")).lower() != "gemm":
        raise LowbitError(f"{name}: lowbit imports 4-bit AWQ GEMM checkpoints only")
    codes = unpack_cols(t["qweight"]).T.contiguous()
    zero = unpack_cols(t["qzeros"]).T.contiguous()
    scale = t["scales"].T.contiguous().to(torch.float16)
    sym = bool((zero == 8).all())
    grid = IntGrid(bits=4, granularity="group", group=int(qcfg["group_size"]), symmetric=sym,
                   scale_dtype="float16")
    return GridWeight(grid, codes, {"scale": scale.float(), "zero": zero.float()})


def read_layers(tensors: dict[str, torch.Tensor], qcfg: dict) -> dict[str, GridWeight]:
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    keys = ("qweight", "qzeros", "scales")
    return {n: read_layer(n, {s: tensors.pop(f"{n}.{s}") for s in keys}, qcfg) for n in names}
