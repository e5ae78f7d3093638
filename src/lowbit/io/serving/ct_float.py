"""lowbit float grids <-> compressed-tensors ``float-quantized`` (FP8) and
``nvfp4-pack-quantized`` (NVFP4), weight-only, written by the library's own compressors.

FP8 (grids ``fp8-e4m3``, ``fp8-e4m3-tensor``, ``fp8-e4m3-b128``): ``name.weight`` as
``float8_e4m3fn`` (lowbit's codes are those bit patterns) and ``name.weight_scale`` fp32 of
shape (out, 1) per channel, (1,) per tensor, (ceil(out/128), ceil(in/128)) per 128x128 block.
The library dequantizes ``fp8 * scale`` in fp32, one rounding like lowbit: bit for bit equal.
E5M2 weights have no compressed-tensors scheme vLLM serves: refused.

NVFP4 (grid ``nvfp4``): ``name.weight_packed`` uint8 (out, in/2), two E2M1 codes per byte;
``name.weight_scale`` float8_e4m3fn (out, in/16) = lowbit's block scale codes, unchanged;
``name.weight_global_scale`` fp32 (1,) = 1 / lowbit's tensor scale (the library divides by it).
Codes (up to the sign of zero: the library packs -0 as +0) and block scales are identical;
the dequantized weights are not bit for bit: the library's decompressor works in bfloat16
(``e2m1 * bf16(s / G)``), lowbit computes ``e2m1 * s * g`` in fp32, rounded once. Importing
takes g = fl(1 / G), which may be one ulp from the g written.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.formats.grids import get_grid
from lowbit.formats.grids_fp import FP8_BLOCK, Fp8Grid, Nvfp4Grid
from lowbit.formats.minifloat import E2M1, E4M3, decode, encode
from lowbit.formats.pack import pack
from lowbit.formats.weight import GridWeight

FP8 = "float-quantized"
NVFP4 = "nvfp4-pack-quantized"


def format_of(qw) -> str | None:
    """The compressed-tensors format for a float grid weight (or grid), None for others."""
    grid = qw.grid if isinstance(qw, GridWeight) else qw
    if isinstance(grid, Fp8Grid):
        if not grid.name.startswith("fp8-e4m3"):
            raise LowbitError(
                f"{grid.name}: compressed-tensors/vLLM serve FP8 weights as E4M3 only; "
                "quantize with fp8-e4m3 (or export as gguf)"
            )
        return FP8
    if isinstance(grid, Nvfp4Grid):
        return NVFP4
    return None


def quant_args(grid):
    from compressed_tensors.quantization import QuantizationArgs

    if isinstance(grid, Nvfp4Grid):
        return QuantizationArgs(
            num_bits=4,
            type="float",
            strategy="tensor_group",
            group_size=16,
            symmetric=True,
            dynamic=False,
            scale_dtype=torch.float8_e4m3fn,
            zp_dtype=torch.float8_e4m3fn,
        )
    kw: dict = {"strategy": grid.granularity}
    if grid.granularity == "block":
        kw["block_structure"] = [FP8_BLOCK, FP8_BLOCK]
    return QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False, **kw)


def _compressor(fmt: str):
    if fmt == FP8:
        from compressed_tensors.compressors.naive_quantized.base import (
            FloatQuantizationCompressor,
        )

        return FloatQuantizationCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor

    return NVFP4PackedCompressor


def _scheme(grid):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=quant_args(grid))


def fp8_scale(gw: GridWeight) -> torch.Tensor:
    """The fp32 scale tensor in the library's shape for the grid's granularity."""
    t = gw.to_tensors()["scales"].float()
    return t.reshape(1) if gw.grid.granularity == "tensor" else t.contiguous()


def layer_tensors(name: str, gw: GridWeight) -> dict[str, torch.Tensor]:
    fmt = format_of(gw)
    comp, scheme = _compressor(fmt), _scheme(gw.grid)
    if fmt == FP8:
        scale = fp8_scale(gw)
        out = comp.compress({"weight": gw.dequantize(), "weight_scale": scale}, scheme)
        if not torch.equal(out["weight"].view(torch.uint8), gw.codes):
            raise LowbitError(f"{name}: compressed-tensors FP8 compression changed the codes")
        return {f"{name}.weight": out["weight"].contiguous(), f"{name}.weight_scale": scale}
    t = gw.to_tensors()
    s = t["scale_codes"].view(torch.float8_e4m3fn)
    g = (1.0 / t["tensor_scale"].double()).float().reshape(1)
    sd = {"weight": gw.dequantize(), "weight_scale": s.float(), "weight_global_scale": g}
    out = comp.compress(sd, scheme)
    if not torch.equal(_nvfp4_codes(out["weight_packed"], gw.shape), plus_zero(gw.codes)):
        raise LowbitError(f"{name}: compressed-tensors NVFP4 packing changed the codes")
    return {
        f"{name}.weight_packed": out["weight_packed"],
        f"{name}.weight_scale": s.contiguous(),
        f"{name}.weight_global_scale": g,
    }


def plus_zero(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes with -0 (0b1000) written as +0: the library packs every zero as +0."""
    return torch.where(codes == 8, torch.zeros_like(codes), codes)


def _nvfp4_codes(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """lowbit E2M1 codes of the library's packed bytes (decoded by the library's unpacker)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    vals = unpack_fp4_from_uint8(packed, shape[0], shape[1], dtype=torch.float32)
    codes, _ = encode(vals, E2M1, saturate=False)
    return plus_zero(codes)


def read_layer(name: str, t: dict[str, torch.Tensor], args: dict) -> GridWeight:
    """One Linear's float-quantized / nvfp4 tensors (without the ``name.`` prefix)."""
    if args.get("type") != "float":
        raise LowbitError(f"{name}: expected float weights, got {args.get('type')}")
    bits, strategy = int(args["num_bits"]), args.get("strategy")
    if bits == 4 and strategy == "tensor_group" and int(args.get("group_size") or 0) == 16:
        packed = t["weight_packed"]
        shape = (packed.shape[0], packed.shape[1] * 2)
        grid = get_grid("nvfp4")
        scale_codes = t["weight_scale"].to(torch.float8_e4m3fn).view(torch.uint8)
        if not torch.equal(decode(scale_codes, E4M3), t["weight_scale"].float()):
            raise LowbitError(f"{name}: NVFP4 block scales are not E4M3 values")
        tensor_scale = (1.0 / t["weight_global_scale"].double()).float().reshape(1)
        codes = _nvfp4_codes(packed, shape)
        stored = {"qweight": pack(codes, 4), "scale_codes": scale_codes.contiguous(),
                  "tensor_scale": tensor_scale}
        return GridWeight.from_tensors(grid, shape, stored)
    if bits != 8 or strategy not in ("channel", "tensor", "block"):
        raise LowbitError(
            f"{name}: compressed-tensors float weights {bits}-bit/{strategy} are not supported "
            "for import; lowbit reads FP8 E4M3 channel/tensor/block and NVFP4"
        )
    w = t["weight"]
    if w.dtype != torch.float8_e4m3fn:
        raise LowbitError(f"{name}: FP8 weight stored as {w.dtype}, expected float8_e4m3fn")
    if strategy == "block" and list(args.get("block_structure") or []) != [FP8_BLOCK, FP8_BLOCK]:
        raise LowbitError(f"{name}: FP8 blocks {args.get('block_structure')}; lowbit reads 128x128")
    suffix = {"channel": "", "tensor": "-tensor", "block": f"-b{FP8_BLOCK}"}[strategy]
    grid = get_grid(f"fp8-e4m3{suffix}")
    out_f, in_f = w.shape
    scale = t["weight_scale"].float()
    want = {"channel": (out_f, 1), "tensor": (1, 1),
            "block": (math.ceil(out_f / FP8_BLOCK), math.ceil(in_f / FP8_BLOCK))}[strategy]
    if scale.numel() != want[0] * want[1]:
        raise LowbitError(f"{name}: FP8 {strategy} scale of shape {tuple(scale.shape)}, "
                          f"expected {want}")
    stored = {"qweight": w.view(torch.uint8).contiguous(), "scales": scale.reshape(want)}
    return GridWeight.from_tensors(grid, (out_f, in_f), stored)
