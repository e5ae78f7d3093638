"""Matrix products straight from packed weight-only codes on the CPU.

A ``QLinear`` multiplies through one of these, chosen per layer when the model is loaded
(``prepare_kernels``); the choice follows from the layer's grid and shape alone
(``kernel_for``), so ``lowbit info`` can say it without loading anything.

- ``lut4``: lowbit's own kernel (``gemv.cpp``, AVX-512 / AVX2 / portable, built at first use by
  ``lowbit.runtime.cpu``) for every grid of at most 4 bits per code whose groups are 16 or a
  multiple of 32 columns (or whole rows): integer grids of 2-4 bits (symmetric, zero points,
  act-order), NF4, FP4, MXFP4, NVFP4, ternary, SqueezeLLM. Each weight is ``s * T[q] + b`` with
  a 16-entry table ``T`` (one per tensor, or per row for SqueezeLLM), a scale ``s`` and an
  offset ``b`` per group: ``lut_form`` finds them by decoding every code of every group and
  checks the decomposition against the grid's own ``decode``. 0.5 bytes per weight plus the
  scales, in fp16 when every scale is exactly an fp16 value (lowbit's symmetric integer grids
  store fp16 scales), else fp32; the decoded weight is never built.
- ``u8``: the same kernel's 8-bit form for integer grids of 5-8 bits (one byte per code).
- ``int4-a8`` / ``int8-a8``: integer grids of 2-4 / 5-8 bits with the activations rounded to
  int8 per 32 columns at each call, as llama.cpp's Q8_0 does, so the sums are integer dot
  products (AVX-512 VNNI ``vpdpbusd``, or ``vpmaddubsw``): faster, and not exact - the result
  is the decoded weight times the rounded x (a perplexity change BENCHMARKS.md reports). Only
  when named; ``auto`` stays exact, ``auto-a8`` takes them wherever they apply and ``auto``'s
  choice elsewhere.
- ``int4pack`` / ``int8pack``: torch's ``_weight_int4pack_mm_for_cpu`` (4-bit integer grids in
  groups of 32-256, scales as ``((q - 8) * s + (8 - zero) * s)``) and ``_weight_int8pack_mm``
  (8-bit per channel, on ``q - 128``). Fast only for bf16 activations (a scalar path for fp32,
  5x slower than the dense product: BENCHMARKS.md, issue 16), so only when named.
- ``dequant``: the weight decoded, then a dense product - what every other grid uses (5-8-bit
  floats, MX 6/8-bit) and the reference the kernels are checked against.

Linears that read one input (q, k and v; gate and up) are multiplied by one call when they
use the same kind of own kernel (``fuse``, done by ``qlinear.fuse_siblings`` for decoding):
their rows stacked, one pass over x, one OpenMP fork/join instead of three.

None is bit-exact: the sums run in another order than a dense GEMM, so results equal the
dequantized reference to fp32 rounding (tests bound the difference). Activations in any float
dtype are multiplied in fp32 by ``lut4``/``u8`` and cast back. Kernels are matrix-vector
kernels: ``QLinear`` sends them at most ``KERNEL_MAX_ROWS`` rows (a decode step), and decodes the
weight for a prompt's many rows.
"""

from __future__ import annotations

import copy
import re
import sys
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.integer import IntGrid
from lowbit.formats.weight import GridWeight

KERNELS = ("auto", "auto-a8", "lut4", "u8", "int4-a8", "int8-a8", "int4pack", "int8pack",
           "dequant")
INT4_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu takes
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def kernel_for(grid, shape: tuple[int, int], g_idx: bool = False) -> str:
    """The kernel ``auto`` picks for a weight of ``shape`` on ``grid`` (``g_idx``: act-order
    stored its column groups)."""
    return next((k for k in ("lut4", "u8") if _takes(k, grid, shape)), "dequant")


def _takes(name: str, grid, shape: tuple[int, int], g_idx: bool = False) -> bool:
    out_f, in_f = shape
    gs = grid.group_size
    if name == "lut4":
        return grid.code_bits <= 4 and in_f % 32 == 0 and (gs is None or gs == 16 or
                                                           gs % 32 == 0)
    if name == "u8":
        return isinstance(grid, IntGrid) and 4 < grid.bits <= 8 and in_f % 16 == 0 and \
            (gs is None or gs % 16 == 0)
    if name in ("int4-a8", "int8-a8"):  # not on grids that round activations their own way
        four = name == "int4-a8"
        return isinstance(grid, IntGrid) and (grid.bits <= 4) == four and grid.bits <= 8 and \
            in_f % 32 == 0 and (gs is None or gs % 32 == 0) and grid.act_bits is None
    if name == "int4pack":
        return (isinstance(grid, IntGrid) and grid.bits == 4 and grid.granularity == "group"
                and grid.group in INT4_GROUPS and in_f % grid.group == 0 and out_f % 16 == 0
                and _has("_weight_int4pack_mm_for_cpu"))
    if name == "int8pack":
        return isinstance(grid, IntGrid) and grid.bits == 8 and grid.granularity != "group" \
            and not g_idx and _has("_weight_int8pack_mm")
    return name == "dequant"


def check_kernel_name(name: str) -> None:
    if name not in KERNELS:
        raise LowbitError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")


def check_kernel(name: str, grid, shape: tuple[int, int], g_idx: bool = False) -> str:
    """Resolve ``auto``; a named kernel that cannot multiply this weight is a LowbitError."""
    check_kernel_name(name)
    if name == "auto-a8":  # int8 activations wherever an a8 kernel takes the weight
        name = next((k for k in ("int4-a8", "int8-a8") if _takes(k, grid, shape)), "auto")
    if name == "auto":
        return kernel_for(grid, shape, g_idx)
    if _takes(name, grid, shape, g_idx):
        return name
    raise LowbitError(f"the {name} kernel cannot multiply a {grid.name} weight of shape "
                      f"{tuple(shape)} (it takes: {_KERNEL_TAKES[name]})")


_KERNEL_TAKES = {
    "lut4": "grids of at most 4 bits per code, groups of 16 or a multiple of 32 columns, an "
            "input size that is a multiple of 32",
    "u8": "5-8-bit integer grids, groups a multiple of 16 columns",
    "int4-a8": "2-4-bit integer grids, groups a multiple of 32 columns, an input size that is a "
               "multiple of 32",
    "int8-a8": "5-8-bit integer grids, groups a multiple of 32 columns, an input size that is a "
               "multiple of 32",
    "int4pack": f"4-bit integer grids in groups of {'/'.join(map(str, INT4_GROUPS))} dividing "
                "the input, output rows a multiple of 16",
    "int8pack": "8-bit integer grids per channel or per tensor, no act-order g_idx",
}


class _PerDtype:
    """A float tensor kept once per activation dtype."""

    def __init__(self, t: Tensor) -> None:
        self._by = {torch.float32: t.float().contiguous()}

    def __call__(self, dtype: torch.dtype) -> Tensor:
        t = self._by.get(dtype)
        if t is None:
            t = self._by[dtype] = self._by[torch.float32].to(dtype)
        return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._by.values())


def _flat(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype not in KERNEL_DTYPES:
        x2 = x2.float()
    return x2.contiguous(), lead


def _group_view(gw: GridWeight) -> tuple[Tensor, Tensor | None, int]:
    """(codes, act-order column order or None, group size) with each group's columns
    contiguous."""
    grid = gw.grid
    k = gw.shape[1]
    group = grid.group_size or k
    codes, perm = gw.codes, None
    if gw.g_idx is not None:  # act-order: the columns gathered so that groups are contiguous
        perm = torch.argsort(gw.g_idx.long(), stable=True)
        counts = torch.bincount(gw.g_idx.long(), minlength=gw.n_groups)
        if bool((counts != group).any()):
            raise LowbitError(f"{grid.name}: act-order groups of unequal size")
        codes = codes[:, perm]
    if grid.signed_codes:  # stored offset by 2^(bits-1) - 1, as the packed form does
        codes = codes.to(torch.int16) + ((1 << (grid.code_bits - 1)) - 1)
    return codes.to(torch.uint8), perm, group


class Int4Pack:
    """``y = x W^T`` for a 4-bit grouped integer weight, packed for torch's CPU int4 kernel."""

    name = "int4pack"
    fast_dtypes = (torch.bfloat16,)

    def __init__(self, gw: GridWeight) -> None:
        codes, self.perm, self.group = _group_view(gw)
        self.out_features = gw.shape[0]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).contiguous(), 1)
        scale, zero = gw.params["scale"].float(), gw.params["zero"].float()
        shift = (8.0 - zero) * scale  # (q - zero) s = (q - 8) s + (8 - zero) s
        self.sz = _PerDtype(torch.stack([scale.T, shift.T], -1))  # (groups, out, 2)

    def __call__(self, x: Tensor) -> Tensor:
        x2, lead = _flat(x)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group,
                                                      self.sz(x2.dtype))
        return y.reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        return self.packed.numel() + self.sz.nbytes() + \
            (0 if self.perm is None else self.perm.numel() * 8)


class Int8Pack:
    """``y = x W^T`` for an 8-bit integer weight with one scale per output row."""

    name = "int8pack"
    fast_dtypes = (torch.bfloat16,)

    def __init__(self, gw: GridWeight) -> None:
        scale = gw.params["scale"].float().reshape(-1)
        zero = gw.params["zero"].float().reshape(-1)
        if scale.numel() == 1:
            scale, zero = scale.expand(gw.shape[0]), zero.expand(gw.shape[0])
        self.out_features = gw.shape[0]
        self.wq = (gw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        self.scale = _PerDtype(scale)
        shift = scale * (128.0 - zero)
        self.shift = _PerDtype(shift) if bool((zero != 128).any()) else None

    def __call__(self, x: Tensor) -> Tensor:
        x2, lead = _flat(x)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.wq, self.scale(x2.dtype))
        if self.shift is not None:
            y = y + x2.sum(-1, keepdim=True) * self.shift(x2.dtype)
        return y.reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        return self.wq.numel() + self.scale.nbytes() + \
            (0 if self.shift is None else self.shift.nbytes())


# how closely ``s * T[q] + b`` must give the grid's own decoded values, relative to the
# group's largest magnitude: fp32 rounding of the products, nothing more
LUT_TOLERANCE = 1e-6


def _code_values(gw: GridWeight) -> Tensor:
    """(out, groups, 2^bits) fp32: what each code decodes to in each group, by the grid."""
    grid = gw.grid
    n_codes = 1 << grid.code_bits
    probe = torch.arange(n_codes)
    if grid.signed_codes:
        probe = (probe - ((1 << (grid.code_bits - 1)) - 1)).to(torch.int8)
    else:
        probe = probe.to(torch.uint8)
    rows = gw.shape[0]
    if grid.group_size is None:  # one group per row
        return grid.decode(probe.expand(rows, n_codes).contiguous(), gw.params).float() \
            .reshape(rows, 1, n_codes)
    pv = {k: v.unsqueeze(-1) if k in grid.group_keys else v for k, v in gw.params.items()}
    codes = probe.expand(rows, gw.n_groups, n_codes).contiguous()
    return grid.decode(codes, pv).float().reshape(rows, gw.n_groups, n_codes)


def lut_form(gw: GridWeight) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(T, s, b)`` with ``W[n, i] = s[n, g] * T[n or 0, q[n, i]] + b[n, g]`` (``b`` None when
    zero): integer grids from their scale and zero point; any other grid of at most 16 codes
    from its decoded code values (``s`` = the group's largest magnitude, ``T`` the values over
    it, one table when every row has the same). A LowbitError if the grid's values do not
    decompose so."""
    grid = gw.grid
    if isinstance(grid, IntGrid):
        n, g = gw.shape[0], gw.n_groups
        scale = gw.params["scale"].float().expand(n, g).contiguous()
        zero = gw.params["zero"].float().expand(n, g)
        if bool((zero == zero.reshape(-1)[0]).all()):  # symmetric: one zero point
            return torch.arange(16.0) - zero.reshape(-1)[0], scale, None
        return torch.arange(16.0), scale, (-zero * scale).contiguous()
    v = _code_values(gw)  # (n, g, codes)
    s = v.abs().amax(-1)  # (n, g)
    best = s.argmax(-1)  # each row's table from its largest group
    rows = torch.arange(v.shape[0])
    sb = s[rows, best]
    t = torch.where(sb[:, None] > 0, v[rows, best] / sb[:, None].clamp_min(1e-38), 0.0)
    live = sb > 0

    def fits(table: Tensor) -> bool:
        err = (s[..., None] * table[:, None, :] - v).abs().amax(-1)
        return not bool((err > LUT_TOLERANCE * s).any())

    if bool(live.any()) and fits(t[live][0:1]):  # one table for the tensor
        t = t[live][0:1]
    elif not fits(t):
        raise LowbitError(f"{grid.name}: the weight does not decompose into a 16-entry table "
                          "and a scale per group (use --kernel dequant)")
    table = torch.zeros(t.shape[0], 16)
    table[:, : t.shape[1]] = t
    return table, s.contiguous(), None


def _pack_nibbles(codes: Tensor) -> Tensor:
    """(n, k) codes 0..15 -> (n, k/2) bytes: in each 32-column chunk, byte j holds column j in
    its low and column j + 16 in its high nibble (gemv.cpp's layout)."""
    n, k = codes.shape
    c = codes.reshape(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


class _OwnKernel:
    """Shared by ``Lut4`` and ``U8``: the codes with each group's columns contiguous, any float
    activations multiplied in fp32, the variant (``isa``) named per call."""

    fast_dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self, gw: GridWeight, isa: str | None) -> None:
        from lowbit.runtime import cpu

        self.ops = cpu.ops()
        self.isa = cpu.ISAS[isa or cpu.isa()]
        self.codes, self.perm, self.group = _group_view(gw)
        self.out_features = gw.shape[0]
        self.table, self.scale, self.bias = lut_form(gw)

    def _x(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.perm is not None:
            x2 = x2[:, self.perm]
        return x2.contiguous(), lead

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.codes, self.table, self.scale, self.bias, self.perm) if t is not None)


class Lut4(_OwnKernel):
    """``y = x W^T`` for a weight of at most 4 bits per code, through ``lut_form``."""

    name = "lut4"

    def __init__(self, gw: GridWeight, isa: str | None = None) -> None:
        super().__init__(gw, isa)
        self.codes = _pack_nibbles(self.codes)
        self.table = self.table.float().reshape(-1, 16).contiguous()
        half = self.scale.half()
        if self.bias is None and bool((half.float() == self.scale).all()):
            self.scale = half  # exactly the same scales in half the bytes (a 10% smaller w4g32)

    def __call__(self, x: Tensor) -> Tensor:
        x2, lead = self._x(x)
        y = self.ops.lut4_mm(x2, self.codes, self.table, self.scale, self.bias, self.group,
                             self.isa)
        return y.reshape(*lead, self.out_features)


class U8(_OwnKernel):
    """``y = x W^T`` for a 5-8-bit integer weight, one byte per code."""

    name = "u8"

    def __init__(self, gw: GridWeight, isa: str | None = None) -> None:
        super().__init__(gw, isa)
        if self.bias is None:  # one zero point for the tensor (the table's first entry)
            self.bias = (self.table[0] * self.scale).contiguous()
        self.table = None  # the codes are the values

    def __call__(self, x: Tensor) -> Tensor:
        x2, lead = self._x(x)
        y = self.ops.u8_mm(x2, self.codes, self.scale, self.bias, self.group, self.isa)
        return y.reshape(*lead, self.out_features)


def _a8_order(k: int) -> Tensor:
    """Column order of ``a8_mm``'s codes, ``k`` padded to a multiple of 64: in each 64-column
    block, element ``e`` is column ``32 * (e // 4 % 2) + 4 * (e // 8) + e % 4`` (gemv.cpp's
    ``a8_col``), so that each 4-element lane of an int8 dot product lies in one 32-column
    chunk, even lanes in the block's first."""
    e = torch.arange(64)
    col = 32 * (e // 4 % 2) + 4 * (e // 8) + e % 4
    kp = -(-k // 64) * 64
    return (torch.arange(0, kp, 64)[:, None] + col).reshape(-1)


class A8(_OwnKernel):
    """``y = x W^T`` for an integer weight, with x quantized to int8 per 32 columns at each
    call (llama.cpp's Q8_0 activations): integer dot products, so faster than ``lut4``/``u8``,
    and not exact: the result is the decoded weight times the quantized x."""

    def __init__(self, gw: GridWeight, isa: str | None = None) -> None:
        super().__init__(gw, isa)
        self.bits = 4 if gw.grid.bits <= 4 else 8
        self.name = f"int{self.bits}-a8"
        # w = s (T0 + q) + b: the table's first entry folds into the offset
        self.bias = ((0 if self.bias is None else self.bias) +
                     self.table[0] * self.scale).float().contiguous()
        self.table = None
        n, k = self.codes.shape
        order = _a8_order(k)
        codes = torch.zeros(n, order.numel(), dtype=torch.uint8)
        codes[:, :k] = self.codes
        codes = codes[:, order]
        if self.bits == 4:  # per block: byte j holds element j (low) and j + 32 (high)
            c = codes.reshape(n, -1, 2, 32)
            codes = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, -1)
        self.codes = codes.contiguous()
        if self.group % 64:  # one scale per 32 columns (padded to 64), offsets per 32 too
            r = self.group // 32
            self.scale = torch.nn.functional.pad(self.scale.repeat_interleave(r, 1),
                                                 (0, order.numel() // 32 - k // 32))
            self.bias = self.bias.repeat_interleave(r, 1).contiguous()
            self.group = 32

    def __call__(self, x: Tensor) -> Tensor:
        x2, lead = self._x(x)
        y = self.ops.a8_mm(x2, self.codes, self.scale, self.bias, self.group, self.bits,
                           self.isa)
        return y.reshape(*lead, self.out_features)


def fuse(kernels: list) -> _OwnKernel | None:
    """One kernel computing the products of several weights that read the same input (q, k and
    v; gate and up), their rows stacked: one call, one pass over x, instead of one per weight.
    None unless all are lowbit's own kernels of one kind, group size, column order and ISA."""
    first = kernels[0]
    same = ("name", "group", "isa", "bits")
    if len(kernels) < 2 or not isinstance(first, _OwnKernel) or any(
            type(k) is not type(first) or
            any(getattr(k, a, None) != getattr(first, a, None) for a in same) or
            (k.perm is None) != (first.perm is None) or
            (k.perm is not None and not torch.equal(k.perm, first.perm)) for k in kernels):
        return None
    out = copy.copy(first)
    out.out_features = sum(k.out_features for k in kernels)
    out.codes = torch.cat([k.codes for k in kernels])
    scales = [k.scale for k in kernels]
    if len({s.dtype for s in scales}) > 1:
        scales = [s.float() for s in scales]
    out.scale = torch.cat(scales).contiguous()
    if any(k.bias is not None for k in kernels):
        out.bias = torch.cat([k.scale.new_zeros(k.scale.shape).float() if k.bias is None
                              else k.bias for k in kernels]).contiguous()
    if first.table is not None and not all(
            k.table.shape[0] == 1 and torch.equal(k.table, first.table) for k in kernels):
        out.table = torch.cat([k.table.expand(k.out_features, -1) for k in kernels]).contiguous()
    return out


# the kernel objects by name, built from a GridWeight (``QLinear`` builds one at first use)
BUILD: dict[str, Callable[[GridWeight], object]] = {
    "lut4": Lut4, "u8": U8, "int4-a8": A8, "int8-a8": A8, "int4pack": Int4Pack,
    "int8pack": Int8Pack}
OWN_KERNELS = ("lut4", "u8", "int4-a8", "int8-a8")  # fast for every activation dtype


def prepare_kernels(model: nn.Module, name: str = "auto") -> Counter:
    """Give every ``QLinear`` of ``model`` its kernel (``auto``: the fastest one that takes its
    weight; ``dequant``: none). Returns how many layers use each kernel."""
    from lowbit.runtime.qlinear import QLinear

    check_kernel_name(name)
    used: Counter = Counter()
    for m in model.modules():
        if isinstance(m, QLinear):
            used[m.use_kernel(name)] += 1
    if any(k in OWN_KERNELS for k in used):
        from lowbit.runtime import cpu

        try:
            cpu.ops()  # built (or loaded from the cache) now, not in the middle of a product
        except LowbitError as e:
            if name != "auto":
                raise
            print(f"note: {e}; multiplying through the decoded weights instead",
                  file=sys.stderr)
            return prepare_kernels(model, "dequant")
    return used


def kernels_by_kind(model: nn.Module) -> dict[str, str]:
    """The kernel of each kind of quantized layer (its name without the block number, e.g.
    ``mlp.down_proj``); kinds whose layers differ list each kernel, most layers first."""
    from lowbit.runtime.qlinear import QLinear

    kinds: dict[str, Counter] = {}
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            kind = re.sub(r"^.*?\.\d+\.", "", name)
            kinds.setdefault(kind, Counter())[m.kernel] += 1
    return {k: "/".join(n for n, _ in c.most_common()) for k, c in kinds.items()}

