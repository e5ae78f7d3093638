"""Matrix products straight from packed weight-only codes on the CPU.

A ``QLinear`` multiplies through one of these, chosen per layer when the model is loaded
(``prepare_kernels``); the choice follows from the layer's grid and shape alone
(``kernel_for``), so ``lowbit info`` can say it without loading anything.

- ``int4pack``: 4-bit integer grids in groups of 32, 64, 128 or 256 (symmetric or with zero
  points; act-order ``g_idx`` too, the input's columns gathered into group order at each call),
  through torch's ``_weight_int4pack_mm_for_cpu``. The kernel computes
  ``((q - 8) * s + z') . x`` with ``z' = (8 - zero) * s``: for symmetric grids ``z' = 0`` and
  every weight is exactly ``grid.decode``'s; with zero points ``(q - 8) * s + z'`` may differ
  from ``(q - zero) * s`` in the last bit. The sums run in another order than a dense GEMM:
  results equal the dequantized reference to fp32 rounding, not bit for bit.
- ``int8pack``: 8-bit integer grids per output channel (or one scale per tensor), through
  ``_weight_int8pack_mm`` on ``q - 128``; zero points other than 128 add ``s * (128 - zero)``
  times the sum of the input. Same exactness as ``int4pack``.
- ``dequant``: every other grid (3/2/5-7 bits, NF4, FP4, MX, NVFP4, SqueezeLLM, ternary): the
  weight decoded at each call (or once, when the model caches decoded weights), then a dense
  product - the reference the other two are checked against.

Activations in fp32 or bf16 go to the kernels as they are (fp16 is computed in fp32); the
kernels' scale tensors are kept per activation dtype. torch's two kernels are fast only for
bf16 activations: with fp32 ones they take a scalar path, 5x slower than the dense product of
the decoded weight (BENCHMARKS.md, issue 16). So ``auto`` multiplies bf16 activations through
the kernel and fp32 ones through the decoded weight (kept decoded when the model caches
weights); a kernel named explicitly (``--kernel int4pack``) is used for every dtype.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.integer import IntGrid
from lowbit.formats.weight import GridWeight

KERNELS = ("auto", "int4pack", "int8pack", "dequant")
INT4_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu takes
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def kernel_for(grid, shape: tuple[int, int], g_idx: bool = False) -> str:
    """The kernel ``auto`` picks for a weight of ``shape`` on ``grid`` (``g_idx``: act-order
    stored its column groups)."""
    out_f, in_f = shape
    if not isinstance(grid, IntGrid):
        return "dequant"
    if (grid.bits == 4 and grid.granularity == "group" and grid.group in INT4_GROUPS
            and in_f % grid.group == 0 and out_f % 16 == 0
            and _has("_weight_int4pack_mm_for_cpu")):
        return "int4pack"
    if grid.bits == 8 and grid.granularity != "group" and not g_idx \
            and _has("_weight_int8pack_mm"):
        return "int8pack"
    return "dequant"


def check_kernel_name(name: str) -> None:
    if name not in KERNELS:
        raise LowbitError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")


def check_kernel(name: str, grid, shape: tuple[int, int], g_idx: bool = False) -> str:
    """Resolve ``auto``; a named kernel that cannot multiply this weight is a LowbitError."""
    check_kernel_name(name)
    best = kernel_for(grid, shape, g_idx)
    if name == "auto":
        return best
    if name in ("dequant", best):
        return name
    raise LowbitError(f"the {name} kernel cannot multiply a {grid.name} weight of shape "
                      f"{tuple(shape)} (it takes: {_KERNEL_TAKES[name]})")


_KERNEL_TAKES = {
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


class Int4Pack:
    """``y = x W^T`` for a 4-bit grouped integer weight, packed for torch's CPU int4 kernel."""

    name = "int4pack"
    fast_dtypes = (torch.bfloat16,)

    def __init__(self, gw: GridWeight) -> None:
        grid: IntGrid = gw.grid  # type: ignore[assignment]
        codes, perm = gw.codes, None
        if gw.g_idx is not None:  # act-order: columns gathered so that groups are contiguous
            perm = torch.argsort(gw.g_idx.long(), stable=True)
            counts = torch.bincount(gw.g_idx.long(), minlength=gw.n_groups)
            if bool((counts != grid.group).any()):
                raise LowbitError("int4pack: act-order groups of unequal size")
            codes = codes[:, perm]
        self.group = grid.group
        self.perm = perm
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


# the kernel objects by name, built from a GridWeight (``QLinear`` builds one at first use)
BUILD: dict[str, Callable[[GridWeight], object]] = {"int4pack": Int4Pack, "int8pack": Int8Pack}


def prepare_kernels(model: nn.Module, name: str = "auto") -> Counter:
    """Give every ``QLinear`` of ``model`` its kernel (``auto``: the fastest one that takes its
    weight; ``dequant``: none). Returns how many layers use each kernel."""
    from lowbit.runtime.qlinear import QLinear

    check_kernel_name(name)
    used: Counter = Counter()
    for m in model.modules():
        if isinstance(m, QLinear):
            used[m.use_kernel(name)] += 1
    return used
