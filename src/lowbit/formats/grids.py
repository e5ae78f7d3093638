"""Every weight format as a ``WeightGrid``: ``get_grid(name)``.

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
| ``w4g64``, ``w3g64-asym``, ... | integer ``IntGrid`` | as ``IntGrid.bits_per_weight`` | |

MX scales follow OCP MX v1.0 (floor(log2 amax) - emax, which saturates the top of a block);
the suffix ``-ceil`` (``mxfp4-ceil``, ...) rounds the exponent up instead so nothing saturates,
``-mse`` picks the better of the two per block.
Optional block suffixes: ``nf4-g128`` / ``nf4-dq-g128`` (32, 64, 128, 256), ``fp4-g16`` ..
``fp4-g128``; MX blocks are fixed at 32, NVFP4 at 16 and FP8 blocks at 128x128.
"""

from __future__ import annotations

import re

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import WeightGrid
from lowbit.formats.grids_fp import FP8_ELEMENTS, MX_NAMES, Fp4Grid, Fp8Grid, MxGrid, Nvfp4Grid
from lowbit.formats.grids_lut import Nf4Grid, SqueezeGrid, TernaryGrid
from lowbit.formats.integer import IntGrid, int_grid_from_dict, parse_int_grid
from lowbit.formats.presets import preset

__all__ = ["GRID_NAMES", "WeightGrid", "get_grid", "grid_from_info", "grid_info"]
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
_INT_HINT = ("integer schemes such as w4g64, w3g64-asym, w8, w8-tensor, w4g64a8, or a "
             "compressed-tensors preset (W4A16, W4A16_ASYM, NVFP4A16, MXFP4A16 ...)")

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
    """The grid of a scheme name (lowbit's, or a weight-only compressed-tensors preset such as
    ``W4A16``); LowbitError listing the known names for anything else."""
    if (p := preset(name.strip())) is not None:
        if p.method is not None:
            raise LowbitError(f"{name} quantizes activations too: it is a scheme of the "
                              f"{p.method} method (--method {p.method} --scheme {name})")
        return get_grid(p.scheme)
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
        return parse_int_grid(n)
    raise LowbitError(f"unknown scheme {name!r}; known: {', '.join(GRID_NAMES)}, and {_INT_HINT}")


def grid_info(grid: WeightGrid) -> dict:
    """How lowbit.json records a layer's grid: its name, and an IntGrid's scale dtype when it is
    not the default fp16 (imported checkpoints)."""
    out = {"grid": grid.name}
    if isinstance(grid, IntGrid) and grid.scale_dtype != "float16":
        out["scale_dtype"] = grid.scale_dtype
    return out


def grid_from_info(info: dict) -> WeightGrid:
    """Inverse of ``grid_info``; also reads lowbit.json v1's integer ``scheme`` records."""
    if "scheme" in info and "grid" not in info:
        return int_grid_from_dict(info["scheme"])
    grid = get_grid(info["grid"])
    if "scale_dtype" in info:
        if not isinstance(grid, IntGrid):
            raise LowbitError(f"{grid.name}: scale_dtype applies to integer grids only")
        grid = IntGrid(grid.bits, grid.granularity, grid.group, grid.symmetric, grid.clip,
                       info["scale_dtype"], grid.act_bits)
    return grid
