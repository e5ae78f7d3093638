"""The runtime Linear of weight-only quantized layers: ``QLinear`` keeps a ``GridWeight``'s
stored tensors as buffers and decodes the weight at each call (or once, with ``cache``).

Every quantized module lowbit builds (``QLinear`` here, ``W8A8Linear``, ``Int8MixedLinear``,
``FP8Linear``) answers the same few questions: ``shape``, ``dequantized_weight()``,
``bits_per_weight()``, ``storage_bytes()``, ``to_tensors()`` and ``layer_info()`` (what
lowbit.json records), so saving, exporting and reporting need no type switches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.grids import grid_info
from lowbit.formats.hadamard import FastRotation
from lowbit.formats.integer import quantize_activations
from lowbit.formats.weight import GridWeight
from lowbit.runtime.kernels import BUILD, OWN_KERNELS, check_kernel


class QuantModule(nn.Module):
    """Shared accounting of the runtime modules (``out_features``, ``in_features`` set by
    subclasses)."""

    out_features: int
    in_features: int
    in_rotation: FastRotation | None = None  # QLinear: its input rotated first (R4)
    out_rotation: FastRotation | None = None  # and its output after (incoherence processing)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.storage_bytes() / (self.out_features * self.in_features)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError


# the kernels (lowbit.runtime.kernels) are matrix-vector kernels: from this many rows on (a
# prompt, an evaluation window) decoding the weight and one dense product is faster (BENCHMARKS)
KERNEL_MAX_ROWS = 16

# stored floating-point tensors are kept as integer views of their bits, so that casting the
# model (``model.half()``, ``.to(torch.bfloat16)``) cannot round the stored scales
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


class QLinear(QuantModule):
    """y = x W_hat^T + b with W_hat = ``GridWeight.dequantize()``, computed in x's dtype."""

    def __init__(self, gw: GridWeight, bias: torch.Tensor | None = None, cache: bool = False):
        super().__init__()
        self._hold(gw.grid, gw.shape, gw.to_tensors(), bias, cache)

    @classmethod
    def from_stored(cls, grid, shape: tuple[int, int], stored: dict[str, torch.Tensor],
                    bias: torch.Tensor | None = None) -> QLinear:
        """A QLinear over stored tensors as they are (``to_tensors``'s form; no decoding, no
        copy: tensors mapped from a file stay in the file until read)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._hold(grid, shape, stored, bias, False)
        return self

    def _hold(self, grid, shape: tuple[int, int], stored: dict[str, torch.Tensor],
              bias: torch.Tensor | None, cache: bool) -> None:
        self.grid = grid
        self.out_features, self.in_features = shape
        self._dtypes = {k: v.dtype for k, v in stored.items()}
        for k, v in stored.items():
            self.register_buffer(k, v.view(_BITS[v.dtype]) if v.dtype in _BITS else v)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.cache = cache
        self._w: torch.Tensor | None = None
        self._kernel_name = "dequant"  # lowbit.runtime.kernels: dequant = decode, dense product
        self._kernel = None  # its object, built from the stored codes at first use
        self._kernel_always = False
        self._siblings: Siblings | None = None  # fuse_siblings: one product with its siblings
        self._sibling_index = 0

    def set_rotations(self, info: dict) -> None:
        """Rotate the input and the output as a layer record says (``layer_info``'s
        ``input_rotation`` and ``output_rotation``; the stored weight was rotated to match)."""
        for key, size, attr in (("input_rotation", self.in_features, "in_rotation"),
                                ("output_rotation", self.out_features, "out_rotation")):
            r = info.get(key)
            if r is not None and (r.get("kind") != "hadamard" or r.get("size") != size):
                raise LowbitError(f"{key} {r} does not fit the layer's {size} features")
            setattr(self, attr, None if r is None else FastRotation(int(r["size"]),
                                                                    int(r["seed"])))

    def grid_weight(self) -> GridWeight:
        return GridWeight.from_tensors(self.grid, self.shape, self.to_tensors())

    def dequantized_weight(self) -> torch.Tensor:
        if self._w is not None:
            return self._w
        w = self.grid_weight().dequantize()
        if self.cache:
            self._w = w
        return w

    @property
    def kernel(self) -> str:
        return self._kernel_name

    def use_kernel(self, name: str = "auto") -> str:
        """Multiply through ``name`` (``lowbit.runtime.kernels``; ``auto``: the fastest that
        takes this weight, for the activation dtypes it is fast in; a named kernel for all);
        returns the kernel used. Its packed copy is made when a product first needs it (an
        fp32 model under ``auto`` never does)."""
        self._kernel_name = check_kernel(name, self.grid, self.shape, "g_idx" in self._dtypes)
        self._kernel_always = name != "auto"
        self._kernel, self._siblings = None, None
        if self._kernel_name in OWN_KERNELS:  # a decoded copy would undo the kernel's saving
            self.cache, self._w = False, None
        return self._kernel_name

    def built_kernel(self):
        """The kernel object (None for ``dequant``), built at its first use."""
        if self._kernel is None and self._kernel_name != "dequant":
            self._kernel = BUILD[self._kernel_name](self.grid_weight())
        return self._kernel

    def kernel_bytes(self) -> int:
        """Bytes of the kernel's packed copy of the weight, once built (fused with siblings:
        this layer's share of the fused copy, by rows)."""
        if self._siblings is not None:
            sib = self._siblings
            return sib.kernel.nbytes() * self.out_features // sum(sib.sizes)
        return 0 if self._kernel is None else self._kernel.nbytes()

    def _through_kernel(self, x: torch.Tensor) -> bool:
        name = self._kernel_name
        return name != "dequant" and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1] and \
            (self._kernel_always or x.dtype in BUILD[name].fast_dtypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_rotation is not None:
            x = self.in_rotation(x)
        act = getattr(self.grid, "act_bits", None)
        if act:  # w4a8 ...: the input rounded per token first (emulated integer activations)
            x = quantize_activations(x, act)
        if self._through_kernel(x):
            sib = self._siblings
            y = (self.built_kernel()(x) if sib is None else sib.take(self._sibling_index, x))
            y = y.to(x.dtype)
            y = y if self.bias is None else y + self.bias.to(x.dtype)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        return y if self.out_rotation is None else self.out_rotation(y)

    def bits_per_weight(self) -> float:
        """As ``GridWeight.bits_per_weight``, without decoding: the grid's accounting, plus
        act-order's g_idx (one int32 per column)."""
        bpw = self.grid.bits_per_weight(*self.shape)
        return bpw + 32 / self.out_features if "g_idx" in self._dtypes else bpw

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors in their own dtypes (the buffers hold their bits)."""
        return {k: getattr(self, k).view(dt) for k, dt in self._dtypes.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._w = None  # new stored tensors: decode again, no kernel built from the old ones
        self._kernel, self._siblings = None, None
        for k, dt in self._dtypes.items():  # accept the tensors in their own dtypes too
            t = state_dict.get(prefix + k)
            if t is not None and t.dtype == dt and dt in _BITS:
                state_dict[prefix + k] = t.view(_BITS[dt])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def layer_info(self) -> dict:
        rot = {k: r.info() for k, r in (("input_rotation", self.in_rotation),
                                         ("output_rotation", self.out_rotation)) if r is not None}
        return {"shape": list(self.shape)} | grid_info(self.grid) | rot

    def extra_repr(self) -> str:
        rot = "" if self.in_rotation is None else f", input rotated ({self.in_rotation.desc})"
        rot += "" if self.out_rotation is None else ", output rotated"
        return (f"in={self.in_features}, out={self.out_features}, grid={self.grid.name}, "
                f"kernel={self.kernel}{rot}")


class Siblings:
    """QLinears that read the same input (q, k, v; gate, up) multiplied by one fused kernel
    (``kernels.fuse``): the first of them called with an input computes every product, the
    others take their part. Any member called with another input (or twice) computes again, so
    results never depend on the order of the calls, only the speed does."""

    def __init__(self, kernel, sizes: list[int]) -> None:
        self.kernel, self.sizes = kernel, sizes
        self.x: torch.Tensor | None = None
        self.outs: list[torch.Tensor | None] | None = None

    def take(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.outs is None or self.x is not x or self.outs[i] is None:
            self.outs = list(self.kernel(x).split(self.sizes, -1))
            self.x = x
        y, self.outs[i] = self.outs[i], None
        if all(o is None for o in self.outs):  # every part taken: hold nothing between steps
            self.x = self.outs = None
        return y


def fuse_siblings(model: nn.Module) -> int:
    """Give the QLinears of each block that read one input (``arch.block_groups``) and use the
    same kind of lowbit kernel one fused kernel: 90 calls fewer per token on a 30-block Llama.
    Their own packed copies are released; every other QLinear's kernel is built. Returns how
    many groups are fused (0 for a family lowbit has no table for)."""
    from lowbit.arch import block_groups, get_blocks, spec_for
    from lowbit.errors import LowbitError
    from lowbit.runtime.kernels import fuse

    try:
        spec = spec_for(model)
        blocks = get_blocks(model, spec)
    except LowbitError:
        return 0
    fused = 0
    for block in blocks:
        try:
            groups = block_groups(block, spec)
        except LowbitError:  # a MoE block's experts still fused in 3-D parameters: none here
            continue
        for group in groups:
            mods = [block.get_submodule(n) for n in group]
            # rotated inputs are new tensors at each call: Siblings would compute every time
            if len(mods) < 2 or not all(isinstance(m, QLinear) and m.kernel in OWN_KERNELS
                                        and m.in_rotation is None for m in mods):
                continue
            if mods[0]._siblings is not None and \
                    all(m._siblings is mods[0]._siblings for m in mods):
                fused += 1  # fused by an earlier call
                continue
            kernel = fuse([m.built_kernel() for m in mods])
            if kernel is None:
                continue
            sib = Siblings(kernel, [m.out_features for m in mods])
            for i, m in enumerate(mods):
                m._siblings, m._sibling_index, m._kernel = sib, i, None
            fused += 1
    for m in model.modules():
        if isinstance(m, QLinear) and m._siblings is None:
            m.built_kernel()
    return fused


def online_rotated(model: nn.Module) -> list[str]:
    """The modules of ``model`` whose input or output is rotated at run time
    (``methods.rotate``'s R4 and incoherence): formats without such transforms cannot hold
    them."""
    return [n for n, m in model.named_modules()
            if getattr(m, "in_rotation", None) is not None or
            getattr(m, "out_rotation", None) is not None]


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")  # unknown: as before


def decoded_fits(model: nn.Module) -> bool:
    """Whether every QLinear's decoded fp32 weight together takes at most half of the memory
    available now."""
    need = sum(4 * m.out_features * m.in_features for m in model.modules()
               if isinstance(m, QLinear))
    return need <= _available_bytes() / 2


@contextmanager
def decoded_once(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``QLinear`` of ``model`` decodes its weight once and keeps it
    (evaluating many windows would otherwise decode every weight at every forward pass: the
    demo's evaluation spent 44 of 74 s decoding, on the 135M model); afterwards the decoded
    copies are dropped and each module's own ``cache`` setting is restored. Memory: the
    decoded weights, fp32 - only when they take at most half of the memory available now
    (``/proc/meminfo``); a larger model (an 8B model's would take 28 GB) decodes each weight
    at each pass instead."""
    mods = [(m, m.cache) for m in model.modules() if isinstance(m, QLinear)]
    fits = decoded_fits(model)
    for m, _ in mods:
        m.cache = fits
    try:
        yield
    finally:
        for m, was in mods:
            m.cache = was
            if not was:
                m._w = None
