"""Integer affine quantization: the ``IntGrid`` weight format and its math. No model knowledge.

Codes are unsigned, q in [0, 2^b - 1], and ``x_hat = scale * (q - zero)``. A symmetric grid
has the fixed zero point 2^(b-1) and ``scale = absmax / ((2^b - 1) / 2)``: all 2^b levels are
used and both extremes land within s/2 (the convention of GPTQ and compressed-tensors). An
asymmetric grid stores an integer zero point per group.

Scheme names (``--scheme``):

- ``w4g64``  4-bit, symmetric, groups of 64 along the input dimension, fp16 scales
- ``w4``     per output channel; ``w8-tensor`` one scale for the whole tensor
- ``-asym``  adds an integer zero point per group; ``-mse`` searches the clipping range
- ``w4g64a8``, ``w4a8``, ``w4a4``: 2-4-bit weights whose Linear also rounds its input per
  token, symmetric, to the given bits at run time (``quantize_activations``; the QuaRot and
  SpinQuant settings after a rotation). The products are emulated: the rounded activations
  times the decoded weight in fp32, the values an integer GEMM would give up to fp32 rounding.

Stored form (the compact layout the serving exports read): ``qweight`` (codes packed at b
bits), ``scales`` (out, groups) in the scale dtype, ``zeros`` (out, groups) packed at b bits
(asymmetric only), and ``g_idx`` (in,) int32 when act-order reordered the columns.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats import pack as packing
from lowbit.formats.grid_base import GridBase, Params, beyond, check_finite, row_sensitivity

Granularity = Literal["tensor", "channel", "group"]
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}

_NAME = re.compile(
    r"^w(?P<bits>\d+)(?:g(?P<group>\d+)|-(?P<tensor>tensor))?(?:a(?P<act>\d+))?"
    r"(?P<opts>(?:-[a-z0-9]+)*)$"
)
_OPTS = {"asym", "sym", "mse", "minmax"}


@dataclass(frozen=True, eq=True)
class IntGrid(GridBase):
    """An integer affine weight format: ``w_hat = scale * (q - zero)``, q in [0, 2^bits - 1]."""

    bits: int = 4
    granularity: Granularity = "group"
    group: int = 64  # columns per group (granularity "group" only)
    symmetric: bool = True
    clip: Literal["minmax", "mse"] = "minmax"
    scale_dtype: Literal["float16", "float32"] = "float16"
    act_bits: int | None = None  # the input rounded per token to this many bits at run time

    group_keys: ClassVar[tuple[str, ...]] = ("scale", "zero")
    column_groups: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LowbitError(f"integer schemes take 2..8 bits, not {self.bits}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise LowbitError(
                f"granularity must be tensor, channel or group, not {self.granularity!r}"
            )
        if self.granularity == "group" and self.group < 1:
            raise LowbitError(f"group size must be positive, not {self.group}")
        if self.clip not in ("minmax", "mse"):
            raise LowbitError(f"clip must be 'minmax' or 'mse', not {self.clip!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale dtype must be float16 or float32, not {self.scale_dtype!r}")
        if self.act_bits is not None:
            if self.bits > 4:
                raise LowbitError(f"activation bits go with 2-4-bit weights (w4a8, w4g64a4); "
                                  f"for 8-bit weights and activations use --method w8a8, not "
                                  f"{self.name}")
            if not 2 <= self.act_bits <= 8:
                raise LowbitError(f"activations take 2..8 bits, not {self.act_bits}")

    # -- the WeightGrid attributes
    @property
    def name(self) -> str:  # type: ignore[override]
        core = f"w{self.bits}"
        if self.granularity == "group":
            core += f"g{self.group}"
        elif self.granularity == "tensor":
            core += "-tensor"
        if self.act_bits is not None:
            core += f"a{self.act_bits}"
        if not self.symmetric:
            core += "-asym"
        if self.clip == "mse":
            core += "-mse"
        return core

    @property
    def group_size(self) -> int | None:  # type: ignore[override]
        return self.group if self.granularity == "group" else None

    @property
    def code_bits(self) -> int:  # type: ignore[override]
        return self.bits

    @property
    def stackable(self) -> bool:  # type: ignore[override]
        return self.granularity != "tensor"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def __repr__(self) -> str:
        return f"IntGrid({self.name!r})"

    def to_dict(self) -> dict:
        return asdict(self) | {"name": self.name}

    def check(self, out_features: int, in_features: int) -> None:
        if self.granularity == "group":
            check_group(self.group, in_features)
        super().check(out_features, in_features)

    def n_groups(self, in_features: int) -> int:
        if self.granularity != "group":
            return 1
        check_group(self.group, in_features)
        return in_features // self.group

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Storage cost per weight: codes plus scales plus zero points."""
        scale_bits = 16 if self.scale_dtype == "float16" else 32
        per_param = scale_bits + (0 if self.symmetric else self.bits)
        if self.granularity == "tensor":
            n_params = 1
        else:
            n_params = out_features * self.n_groups(in_features)
        return self.bits + per_param * n_params / (out_features * in_features)

    # -- fitting and rounding
    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params:
        """Per-tensor grids: the one scale and zero point of the whole weight."""
        check_finite(w_full)
        if self.granularity != "tensor":
            return {}
        wf = w_full.detach().float()
        s = row_sensitivity(sensitivity, *wf.shape)
        cw = None if s is None else s.float().reshape(1, -1)
        scale, zero = fit_qparams(wf.reshape(1, -1), self, cw)
        return {"scale": scale, "zero": zero}

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        check_finite(w)
        wf = w.detach().float()
        if self.granularity == "tensor":
            if not ctx:
                ctx = self.prepare(wf)
            scale = ctx["scale"].reshape(1, 1).expand(wf.shape[0], 1).clone()
            zero = ctx["zero"].reshape(1, 1).expand(wf.shape[0], 1).clone()
        else:
            scale, zero = fit_qparams(wf, self, weight)
        return {"scale": scale, "zero": zero}

    def fit_all(self, w: Tensor, sensitivity: Tensor | None = None,
                ctx: Params | None = None) -> Params:
        """All groups at once (rows of the group view), ``sensitivity`` (in,) weighting the MSE
        clipping search."""
        check_finite(w)
        scale, zero = fit_weight(w, self, sensitivity)
        return {"scale": scale, "zero": zero}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        return quantize(x.detach().float(), params["scale"], params["zero"],
                        self.bits).to(torch.uint8)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return dequantize(codes.float(), params["scale"], params["zero"])

    def round_trip(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        q = quantize(x.detach().float(), params["scale"], params["zero"], self.bits)
        return q.to(torch.uint8), dequantize(q, params["scale"], params["zero"])

    def saturated(self, x: Tensor, params: Params) -> Tensor:
        v = x.detach().float() / params["scale"] + params["zero"]
        return beyond(v, 0, self.qmax, 0.5, 0.5)

    # -- stored form
    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]:
        scale, zero = params["scale"], params["zero"]
        if self.granularity == "tensor":  # one scale (and zero point) for the whole tensor
            scale, zero = scale[:1], zero[:1]
        out = {"scales": scale.to(SCALE_DTYPES[self.scale_dtype])}
        if not self.symmetric:
            out["zeros"] = packing.pack(zero.to(torch.uint8), self.bits)
        return out

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params:
        scale = tensors["scales"].float()
        if not self.symmetric:
            zero = packing.unpack(tensors["zeros"], self.bits, scale.shape[1]).float()
        else:
            zero = torch.full_like(scale, float(1 << (self.bits - 1)))
        if self.granularity == "tensor" and scale.shape[0] == 1:  # (version 1 stored per row)
            scale, zero = scale.expand(shape[0], 1).clone(), zero.expand(shape[0], 1).clone()
        return {"scale": scale, "zero": zero}


def check_group(group_size: int, in_features: int) -> None:
    if in_features % group_size:
        ok = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise LowbitError(
            f"group size {group_size} does not divide the input dimension {in_features}; "
            f"group sizes that do: {', '.join(map(str, ok)) or 'none of 16..256'}"
        )


def parse_int_grid(name: str) -> IntGrid:
    """Parse ``w4g64``, ``w3g64-asym``, ``w8``, ``w8-tensor``, ``w4g128-mse`` ..."""
    m = _NAME.match(name.strip().lower())
    if not m:
        raise LowbitError(
            f"unknown scheme {name!r}; integer schemes look like w4g64, w4g64-asym, w8, "
            "w8-tensor, w3g64-mse"
        )
    opts = [o for o in m.group("opts").split("-") if o]
    bad = [o for o in opts if o not in _OPTS]
    if bad:
        raise LowbitError(f"unknown scheme option(s) {bad} in {name!r}; options: {sorted(_OPTS)}")
    if m.group("group"):
        gran, gs = "group", int(m.group("group"))
    elif m.group("tensor"):
        gran, gs = "tensor", 0
    else:
        gran, gs = "channel", 0
    return IntGrid(
        bits=int(m.group("bits")),
        granularity=gran,  # type: ignore[arg-type]
        group=gs,
        symmetric="asym" not in opts,
        clip="mse" if "mse" in opts else "minmax",
        act_bits=int(m.group("act")) if m.group("act") else None,
    )


def quantize_activations(x: Tensor, bits: int) -> Tensor:
    """x rounded per token (each row of the last dimension) to ``bits``-bit signed integers
    with the symmetric scale ``max|x| / (2^(bits-1) - 1)``, half to even, and scaled back."""
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(xf / s).clamp(-qmax, qmax) * s).to(x.dtype)


def _round_scale_up(scale: Tensor, dtype: str) -> Tensor:
    """Round scales to their storage dtype, upward, so no value is clipped by the rounding."""
    tdt = SCALE_DTYPES[dtype]
    tiny = 2.0**-24 if tdt == torch.float16 else 1e-30
    scale = scale.clamp(min=tiny)
    stored = scale.to(tdt)
    low = stored.float() < scale
    if low.any():
        stored = torch.where(
            low, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored
        )
    return stored.float()


def qparams_from_range(
    xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool, scale_dtype: str = "float16"
) -> tuple[Tensor, Tensor]:
    """Scale and zero point (float tensors of the same shape) covering [xmin, xmax]."""
    qmax = (1 << bits) - 1
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        scale = _round_scale_up(absmax / (qmax / 2), scale_dtype)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    # the zero point is stored as a b-bit code, so the range must contain 0
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    span = xmax - xmin
    span = torch.where(span == 0, torch.ones_like(span), span)
    scale = _round_scale_up(span / qmax, scale_dtype)
    zero = torch.round(-xmin / scale).clamp(0, qmax)
    return scale, zero


def quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes q = clamp(round(x / scale) + zero, 0, 2^b - 1), as float (exact small integers)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, (1 << bits) - 1)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (q - zero)


def fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return dequantize(quantize(x, scale, zero, bits), scale, zero)


def fit_qparams(
    w: Tensor,
    grid: IntGrid,
    weight: Tensor | None = None,
    steps: int = 80,
    max_shrink: float = 0.8,
) -> tuple[Tensor, Tensor]:
    """Scale and zero for each row of ``w`` (rows, n): shape (rows, 1).

    ``clip="minmax"`` covers each row's range; ``clip="mse"`` shrinks the range by factors
    in [1 - max_shrink, 1] and keeps, per row, the factor with the lowest squared error,
    optionally weighted by ``weight`` (broadcastable to ``w``), e.g. the Hessian diagonal.
    """
    w = w.float()
    xmin = w.min(dim=1, keepdim=True).values
    xmax = w.max(dim=1, keepdim=True).values
    scale, zero = qparams_from_range(xmin, xmax, grid.bits, grid.symmetric, grid.scale_dtype)
    if grid.clip == "minmax":
        return scale, zero
    cw = torch.ones(1) if weight is None else weight.float().clamp(min=0)

    def err(s: Tensor, z: Tensor) -> Tensor:
        return (((fake_quantize(w, s, z, grid.bits) - w) ** 2) * cw).sum(1, keepdim=True)

    best = err(scale, zero)
    for i in range(1, steps + 1):
        p = 1 - max_shrink * i / steps
        s, z = qparams_from_range(p * xmin, p * xmax, grid.bits, grid.symmetric, grid.scale_dtype)
        e = err(s, z)
        better = e < best
        best = torch.where(better, e, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def group_view(w: Tensor, grid: IntGrid) -> Tensor:
    """(out, in) -> (out * groups, group) rows that share one scale; tensor -> (1, out*in)."""
    out_f, in_f = w.shape
    if grid.granularity == "tensor":
        return w.reshape(1, -1)
    if grid.granularity == "channel":
        return w
    g = grid.n_groups(in_f)
    return w.reshape(out_f * g, in_f // g)


def fit_weight(
    w: Tensor, grid: IntGrid, col_weight: Tensor | None = None, fitter=None
) -> tuple[Tensor, Tensor]:
    """Per-group parameters for a whole (out, in) weight: scale, zero of shape (out, groups).

    ``col_weight`` (in,) weights each input column's squared error in the MSE search;
    ``fitter(rows, grid, weight) -> (scale, zero)`` replaces ``fit_qparams`` (e.g. HQQ).
    """
    out_f, in_f = w.shape
    cw = None
    if col_weight is not None:
        cw = group_view(col_weight.float().expand(out_f, in_f), grid)
    scale, zero = (fitter or fit_qparams)(group_view(w.float(), grid), grid, cw)
    if grid.granularity == "tensor":
        return scale.expand(out_f, 1).clone(), zero.expand(out_f, 1).clone()
    return scale.reshape(out_f, -1), zero.reshape(out_f, -1)


def int_grid_from_dict(d: dict) -> IntGrid:
    """An IntGrid from its dict form (lowbit.json v1 ``scheme`` records use ``group_size``)."""
    return IntGrid(
        bits=int(d["bits"]),
        granularity=d.get("granularity", "group"),
        group=int(d.get("group", d.get("group_size", 0)) or 0),
        symmetric=bool(d.get("symmetric", True)),
        clip=d.get("clip", "minmax"),
        scale_dtype=d.get("scale_dtype", "float16"),
        act_bits=d.get("act_bits"),
    )
