"""A weight rounded onto a ``WeightGrid``: codes, per-group parameters, and their stored form.

Stored tensors (``to_tensors``), per grid; ``n_groups`` = groups along the input dimension:

| grid | tensors besides ``qweight`` (packed codes) |
|---|---|
| ``fp8-*`` per channel | ``scales`` fp32 (out, 1) |
| ``fp8-*-tensor`` | ``scales`` fp32 (1, 1) |
| ``fp8-*-b128`` | ``scales`` fp32 (ceil(out / 128), n_groups): one per 128x128 block |
| ``fp4-g*`` | ``scales`` fp16 (out, n_groups) (the fp32 params hold fp16 values) |
| MX | ``scale_codes`` uint8 (out, n_groups): the E8M0 codes (exponent = code - 127) |
| ``nvfp4`` | ``scale_codes`` uint8 (out, n_groups) E4M3 codes, ``tensor_scale`` fp32 (1,) |
| ``nf4`` | ``absmax`` fp32 (out, n_groups) |
| ``nf4-dq`` | ``absmax_codes`` uint8 (out, n_groups) 8-bit dynamic-map codes, ``dq_block_scales`` |
| | fp32 (one per 256 absmaxes in row-major order), ``dq_offset`` fp32 (1,) |
| ``ternary`` | ``gamma`` fp32 (1,) |
| ``sq*`` | ``tables`` fp16 (out, 2^bits): each row's centroids |
| any other grid | ``p_<key>`` per parameter, stacked over the groups in its own dtype |

A compact form is written only where it decodes to the in-memory parameters exactly (checked
at save time); otherwise the float32 parameter itself is stored (``scales`` fp32 for fp4,
``absmax`` fp32 beside the NF4-DQ codes), so ``dequantize`` after a reload is always bit-
identical. Codes are packed with ``formats.pack.pack`` at the grid's ``code_bits``; signed
(int8) codes - ternary, MXINT8 - are stored as ``code + 2^(code_bits-1) - 1`` (ternary
{-1, 0, 1} -> {0, 1, 2}, MXINT8 [-127, 127] -> [0, 254]). Saturation counts are not stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import pack as packing
from lowbit.formats.codebooks import DQ_BLOCK, lookup
from lowbit.formats.grid_base import Params, WeightGrid
from lowbit.formats.grids import count_saturated, get_grid, group_slices
from lowbit.formats.grids_fp import FP8_BLOCK, Fp4Grid, Fp8Grid, MxGrid, Nvfp4Grid
from lowbit.formats.grids_lut import Nf4Grid, SqueezeGrid, TernaryGrid
from lowbit.formats.mx import E8M0_BIAS

CODE_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}


@dataclass
class GridWeight:
    """``W_hat[:, group g] = grid.decode(codes[:, group g], params[g])``."""

    grid: WeightGrid
    codes: Tensor  # (out, in) as grid.encode returns them: uint8, or int8 (ternary, MXINT8)
    params: list[Params]  # per group, as the grid fitted (and finalized) them

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def name(self) -> str:
        return self.grid.name

    def saturated(self) -> int:
        """Elements clipped beyond the grid while encoding (not stored)."""
        return count_saturated(self.params)

    def dequantize(self) -> Tensor:
        """float32 (out, in), exactly as ``grids.rtn`` / ``gptq_grid`` returned w_hat."""
        slices = group_slices(self.grid, self.shape[1])
        return torch.cat(
            [self.grid.decode(self.codes[:, sl], p) for sl, p in zip(slices, self.params,
                                                                       strict=True)], 1
        )

    def bits_per_weight(self) -> float:
        """The grid's own accounting for this shape."""
        return self.grid.bits_per_weight(*self.shape)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def describe(self) -> dict:
        """What lowbit.json records per layer (besides shape)."""
        return {"grid": self.grid.name, "code_dtype": str(self.codes.dtype).removeprefix("torch.")}

    def to_tensors(self) -> dict[str, Tensor]:
        """The tensors stored on disk: ``qweight`` (packed codes) and the grid's parameters."""
        bits = self.grid.code_bits
        codes = self.codes
        if codes.dtype == torch.int8:
            codes = codes.to(torch.int16) + _code_offset(bits)
        out = {"qweight": packing.pack(codes, bits)}
        out |= _store_params(self.grid, self.params, self.shape)
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(
        cls,
        grid: WeightGrid | str,
        shape: tuple[int, int],
        tensors: dict[str, Tensor],
        code_dtype: str = "uint8",
    ) -> GridWeight:
        """Inverse of ``to_tensors`` (``grid`` may be its scheme name)."""
        if isinstance(grid, str):
            grid = get_grid(grid)
        out_f, in_f = shape
        codes = packing.unpack(tensors["qweight"], grid.code_bits, in_f)
        if CODE_DTYPES[code_dtype] == torch.int8:
            codes = (codes.to(torch.int16) - _code_offset(grid.code_bits)).to(torch.int8)
        n_groups = len(group_slices(grid, in_f))
        params = _load_params(grid, tensors, out_f, n_groups)
        return cls(grid, codes, params)


def _code_offset(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _stack(params: list[Params], key: str) -> Tensor:
    return torch.cat([p[key] for p in params], 1)


def _split(t: Tensor) -> list[Tensor]:
    return [t[:, g : g + 1] for g in range(t.shape[1])]


def _fp16_if_exact(t: Tensor) -> Tensor:
    h = t.to(torch.float16)
    return h if torch.equal(h.float(), t) else t


def _one_value(t: Tensor) -> Tensor | None:
    """The single value of a tensor whose elements are all equal, as shape (1,)."""
    flat = t.reshape(-1)
    return flat[:1].clone() if torch.equal(flat, flat[:1].expand_as(flat)) else None


def _nf4_dq_absmax(codes: Tensor, block_scales: Tensor, offset: Tensor, grid: Nf4Grid) -> Tensor:
    """(out, groups) absmax from its 8-bit codes, as ``Nf4Grid.fit`` computes it."""
    s = block_scales.repeat_interleave(DQ_BLOCK)[: codes.numel()].view(codes.shape)
    return lookup(codes, grid._dyn) * s + offset


def _store_params(grid: WeightGrid, params: list[Params], shape: tuple[int, int]) -> dict:
    out_f = shape[0]
    if isinstance(grid, Fp8Grid):
        scales = _stack(params, "scale")
        if grid.granularity == "tensor" and (one := _one_value(scales)) is not None:
            return {"scales": one.reshape(1, 1)}
        if grid.granularity == "block":
            blocks = scales[::FP8_BLOCK]
            rebuilt = blocks.repeat_interleave(FP8_BLOCK, 0)[:out_f]
            if torch.equal(rebuilt, scales):
                return {"scales": blocks}
        return {"scales": scales}
    if isinstance(grid, Fp4Grid):
        return {"scales": _fp16_if_exact(_stack(params, "scale"))}
    if isinstance(grid, MxGrid):
        return {"scale_codes": _stack(params, "scale_code")}
    if isinstance(grid, Nvfp4Grid):
        ts = params[0]["tensor_scale"].reshape(1).float()
        return {"scale_codes": _stack(params, "scale_code"), "tensor_scale": ts}
    if isinstance(grid, Nf4Grid):
        absmax = _stack(params, "absmax")
        if not grid.double_quant:
            return {"absmax": absmax}
        p0 = params[0]
        out = {
            "absmax_codes": _stack(params, "absmax_code"),
            "dq_block_scales": p0["dq_block_scales"].float(),
            "dq_offset": p0["dq_offset"].reshape(1).float(),
        }
        rebuilt = _nf4_dq_absmax(out["absmax_codes"], out["dq_block_scales"], out["dq_offset"],
                                 grid)
        if not torch.equal(rebuilt, absmax):
            out["absmax"] = absmax
        return out
    if isinstance(grid, TernaryGrid):
        gamma = _stack(params, "gamma")
        one = _one_value(gamma)
        return {"gamma": one} if one is not None else {"p_gamma": gamma}
    if isinstance(grid, SqueezeGrid):
        return {"tables": _fp16_if_exact(params[0]["table"])}
    keys = [k for k in params[0] if k != "saturated"]
    return {f"p_{k}": torch.stack([p[k] for p in params]) for k in keys}


def _load_params(grid: WeightGrid, t: dict[str, Tensor], out_f: int, n_groups: int) -> list[Params]:
    if isinstance(grid, Fp8Grid):
        s = t["scales"].float()
        if grid.granularity == "block" and s.shape[0] != out_f:
            s = s.repeat_interleave(FP8_BLOCK, 0)[:out_f]
        s = s.expand(out_f, n_groups)
        return [{"scale": c.clone()} for c in _split(s)]
    if isinstance(grid, Fp4Grid):
        return [{"scale": c} for c in _split(t["scales"].float())]
    if isinstance(grid, MxGrid):
        codes = t["scale_codes"]
        exp = codes.to(torch.int64) - E8M0_BIAS
        return [{"exp": e, "scale_code": c} for e, c in zip(_split(exp), _split(codes),
                                                            strict=True)]
    if isinstance(grid, Nvfp4Grid):
        ts = t["tensor_scale"].float().reshape(())
        return [{"tensor_scale": ts, "scale_code": c} for c in _split(t["scale_codes"])]
    if isinstance(grid, Nf4Grid):
        if not grid.double_quant:
            return [{"absmax": c, "absmax_raw": c} for c in _split(t["absmax"].float())]
        codes, scales = t["absmax_codes"], t["dq_block_scales"].float()
        offset = t["dq_offset"].float().reshape(())
        absmax = t.get("absmax")
        if absmax is None:
            absmax = _nf4_dq_absmax(codes, scales, offset, grid)
        extra = {"dq_offset": offset, "dq_block_scales": scales}
        return [
            {"absmax": a, "absmax_raw": a, "absmax_code": c} | extra
            for a, c in zip(_split(absmax.float()), _split(codes), strict=True)
        ]
    if isinstance(grid, TernaryGrid):
        if "gamma" in t:
            g = t["gamma"].float().reshape(1, 1).expand(out_f, 1).clone()
            return [{"gamma": g}]
        return [{"gamma": c} for c in _split(t["p_gamma"].float())]
    if isinstance(grid, SqueezeGrid):
        return [{"table": t["tables"].float()}]
    keys = [k.removeprefix("p_") for k in t if k.startswith("p_")]
    return [{k: t[f"p_{k}"][g] for k in keys} for g in range(n_groups)]
