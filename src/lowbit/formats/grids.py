"""Weight formats as grids that RTN and GPTQ can round onto: ``get_grid(name)`` and ``rtn``.

Scheme names (``--scheme``), bits per weight for an (out, in) weight:

| name | elements | parameters | bits per weight |
|---|---|---|---|
| ``nf4`` | NF4 code book | fp32 absmax per 64 | 4.5 |
| ``nf4-dq`` | NF4 | absmax as 8-bit codes, fp32 per 256 blocks, fp32 mean | ~4.127 |
| ``fp8-e4m3``, ``fp8-e5m2`` | FP8 | fp32 amax / max per output channel | 8 + 32 / in |
| ``fp8-e4m3-tensor`` | FP8 | one fp32 scale | 8 + 32 / (out in) |
| ``fp8-e4m3-b128`` | FP8 | fp32 per 128 rows x 128 columns | ~8 + 32 / 128^2 |
| ``fp4-g32`` | E2M1 | fp16 amax / 6 per 32 (rounded up) | 4.5 |
| ``mxfp4``, ``mxfp6-e3m2``, ``mxfp6-e2m3`` | OCP MX | E8M0 per 32 | element bits + 0.25 |
| ``mxfp8-e4m3``, ``mxfp8-e5m2``, ``mxint8`` | OCP MX | E8M0 per 32 | 8.25 |
| ``nvfp4`` | E2M1 | E4M3 per 16 + fp32 per tensor | 4.5 + 32 / (out in) |
| ``sq3``, ``sq4`` (``sq2``) | SqueezeLLM | per-row fp16 table of 2^b centroids | b + 16 2^b / in |
| ``ternary`` | {-1, 0, 1} | fp32 absmean per tensor | 2 + 32 / (out in) |
| ``w4g64``, ``w3g64-asym``, ... | integer ``Scheme`` | as ``Scheme.bits_per_weight`` | |

MX scales follow OCP MX v1.0 (floor(log2 amax) - emax, which saturates the top of a block);
the suffix ``-ceil`` (``mxfp4-ceil``, ...) rounds the exponent up instead so nothing saturates,
``-mse`` picks the better of the two per block.
Optional block suffixes: ``nf4-g128`` / ``nf4-dq-g128`` (32, 64, 128, 256), ``fp4-g16`` ..
``fp4-g128``; MX blocks are fixed at 32, NVFP4 at 16 and FP8 blocks at 128x128.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import Params, WeightGrid, check_finite
from lowbit.formats.grids_fp import FP8_ELEMENTS, MX_NAMES, Fp4Grid, Fp8Grid, MxGrid, Nvfp4Grid
from lowbit.formats.grids_lut import IntGrid, Nf4Grid, SqueezeGrid, TernaryGrid
from lowbit.scheme import parse_scheme

__all__ = ["GRID_NAMES", "WeightGrid", "count_saturated", "get_grid", "group_slices", "rtn"]

GRID_NAMES: tuple[str, ...] = (
    "nf4",
    "nf4-dq",
    "fp8-e4m3",
    "fp8-e5m2",
    "fp8-e4m3-tensor",
    "fp8-e5m2-tensor",
    "fp8-e4m3-b128",
    "fp8-e5m2-b128",
    "fp4-g32",
    *MX_NAMES,
    "nvfp4",
    "sq3",
    "sq4",
    "ternary",
)
_INT_HINT = "integer schemes such as w4g64, w3g64-asym, w8, w8-tensor"

_NF = re.compile(r"nf(\d+)(-dq)?(?:-g(\d+))?")
_FP8 = re.compile(r"fp8-([a-z0-9]+?)(?:-(tensor|b\d+))?")
_FP4 = re.compile(r"fp4(?:-g(\d+))?")
_MX = re.compile(r"mx(fp\d+|int\d+)(?:-(e\dm\d))?(?:-g(\d+))?(?:-(ceil|mse))?")
_NVFP4 = re.compile(r"nvfp4(?:-g(\d+))?")
_SQ = re.compile(r"sq(\d+)")


def _mx(kind: str, elem: str | None, group: str | None, rounding: str | None,
        name: str) -> WeightGrid:
    base = f"mx{kind}" + (f"-{elem}" if elem else "")
    if base not in MX_NAMES:
        raise LowbitError(f"unknown MX format {name!r}; MX formats: {', '.join(MX_NAMES)}")
    if group is not None and int(group) != 32:
        raise LowbitError(f"{name!r}: the OCP MX v1.0 block size is 32 only (use {base})")
    return MxGrid(base, rounding or "floor")


def get_grid(name: str) -> WeightGrid:
    """The grid of a scheme name; LowbitError listing the known names for anything else."""
    n = name.strip().lower()
    if m := _NF.fullmatch(n):
        if int(m.group(1)) != 4:
            raise LowbitError(f"{name!r}: NormalFloat is defined for 4 bits only (nf4, nf4-dq)")
        return Nf4Grid(int(m.group(3) or 64), double_quant=bool(m.group(2)))
    if m := _FP8.fullmatch(n):
        elem, gran = m.group(1), m.group(2)
        if elem not in FP8_ELEMENTS:
            raise LowbitError(f"{name!r}: fp8 elements are {', '.join(FP8_ELEMENTS)}")
        if gran is None:
            return Fp8Grid(elem, "channel")
        if gran == "tensor":
            return Fp8Grid(elem, "tensor")
        if gran != "b128":
            raise LowbitError(f"{name!r}: fp8 blocks are 128x128 only (fp8-{elem}-b128)")
        return Fp8Grid(elem, "block")
    if m := _FP4.fullmatch(n):
        return Fp4Grid(int(m.group(1) or 32))
    if m := _MX.fullmatch(n):
        return _mx(m.group(1), m.group(2), m.group(3), m.group(4), name)
    if m := _NVFP4.fullmatch(n):
        if m.group(1) is not None and int(m.group(1)) != 16:
            raise LowbitError(f"{name!r}: the NVFP4 block size is 16 only (use nvfp4)")
        return Nvfp4Grid()
    if m := _SQ.fullmatch(n):
        return SqueezeGrid(int(m.group(1)))
    if n == "ternary":
        return TernaryGrid()
    if re.fullmatch(r"w\d+.*", n):
        return IntGrid(parse_scheme(n))
    raise LowbitError(f"unknown scheme {name!r}; known: {', '.join(GRID_NAMES)}, and {_INT_HINT}")


def group_slices(grid: WeightGrid, in_features: int) -> list[slice]:
    """The column slices sharing one set of parameters."""
    gs = grid.group_size or in_features
    return [slice(c, c + gs) for c in range(0, in_features, gs)]


def count_saturated(params_by_group: list[Params]) -> int:
    """Total elements clipped beyond the grid over all groups."""
    return sum(int(p.get("saturated", 0)) for p in params_by_group)


def rtn(
    w: Tensor, grid: WeightGrid, sensitivity: Tensor | None = None
) -> tuple[Tensor, list[Params], Tensor]:
    """Round an (out, in) weight to its nearest grid points: (codes, params per group, w_hat).

    ``sensitivity`` ((in,) or (out, in), e.g. the Hessian diagonal) weights SqueezeLLM's k-means
    and the integer schemes' MSE clipping search.
    """
    check_finite(w)
    wf = w.detach().float()
    out_f, in_f = wf.shape
    grid.check(out_f, in_f)
    ctx = grid.prepare(wf, sensitivity)
    slices = group_slices(grid, in_f)
    params = []
    for g, sl in enumerate(slices):
        weight = None
        if sensitivity is not None:
            weight = sensitivity[..., sl].float()
        params.append(grid.fit(wf[:, sl], weight, ctx=ctx, group=g))
    params = grid.finalize(params)
    codes = torch.cat([grid.encode(wf[:, sl], p) for sl, p in zip(slices, params, strict=True)], 1)
    w_hat = torch.cat(
        [grid.decode(codes[:, sl], p) for sl, p in zip(slices, params, strict=True)], 1
    )
    return codes, params, w_hat
