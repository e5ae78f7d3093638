"""Minifloat grids: FP8 (per channel, per tensor, 128x128 blocks), FP4 with fp16 scales, OCP MX
(MXFP4/6/8, MXINT8) and NVFP4, built on ``minifloat`` and ``mx``.

Codes are the element format's bit patterns (uint8); MXINT8 codes are int8 (value k/64).
FP8 and FP4 divide by the scale in float32 (as ``(w / s).to(float8)`` does); MX and NVFP4
scale in float64 exactly as ``mx.mx_quantize`` / ``mx.nvfp4_quantize`` do.

Stored forms: FP8 ``scales`` fp32 (out, 1) per channel, (1, 1) per tensor, (ceil(out / 128),
groups) per 128x128 block; FP4 ``scales`` fp16 (out, groups) (fp32 if fp16 is not exact); MX
``scale_codes`` uint8 (out, groups), the E8M0 codes (exponent = code - 127); NVFP4
``scale_codes`` uint8 (out, groups) E4M3 codes and ``tensor_scale`` fp32 (1,).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import (
    GridBase,
    Params,
    check_finite,
    divisors_message,
    fp16_if_exact,
    minifloat_overflow,
    one_value,
)
from lowbit.formats.minifloat import E2M1, E4M3, E5M2, E8M0, MiniFloat, decode, encode, max_value
from lowbit.formats.mx import (
    E2M1_MAX,
    E4M3_MAX,
    E8M0_BIAS,
    ELEMENTS,
    INT8_FRAC_BITS,
    NVFP4_BLOCK,
    mx_scale_exponents,
)

FP8_ELEMENTS: dict[str, MiniFloat] = {"e4m3": E4M3, "e5m2": E5M2}
FP8_BLOCK = 128  # DeepSeek-V3 style: one fp32 scale per 128 rows x 128 columns
FP4_GROUPS = (16, 32, 64, 128)
MX_BLOCK = 32


def _amax_scale(amax: Tensor, vmax: float) -> Tensor:
    """fp32 scale amax / vmax; 1 where amax is 0."""
    return torch.where(amax > 0, amax / vmax, torch.ones_like(amax))


def _fp16_up(scale: Tensor) -> Tensor:
    """Round fp32 scales up into fp16 (so nothing clips by the rounding), within fp16's range."""
    s = scale.clamp(2.0**-24, 65504.0)
    h = s.to(torch.float16)
    low = h.float() < s
    h = torch.where(low, torch.nextafter(h, torch.full_like(h, torch.inf)), h)
    return h.float()


class Fp8Grid(GridBase):
    """FP8 elements, scale = amax / max_value in fp32: per output channel, per tensor, or per
    128x128 block (names ``fp8-e4m3``, ``fp8-e4m3-tensor``, ``fp8-e4m3-b128``; same for e5m2)."""

    code_bits = 8

    def __init__(
        self, elem: str = "e4m3", granularity: Literal["channel", "tensor", "block"] = "channel"
    ) -> None:
        if elem not in FP8_ELEMENTS:
            raise LowbitError(f"fp8 elements: {', '.join(FP8_ELEMENTS)}; not {elem!r}")
        self.fmt = FP8_ELEMENTS[elem]
        self.granularity = granularity
        suffix = {"channel": "", "tensor": "-tensor", "block": f"-b{FP8_BLOCK}"}[granularity]
        self.name = f"fp8-{elem}{suffix}"
        self.group_size = FP8_BLOCK if granularity == "block" else None
        self.allowed_groups = (FP8_BLOCK,)
        self.group_keys = ("scale",)
        self.stackable = granularity == "channel"  # 128-row blocks and tensor scales span rows
        self.vmax = max_value(self.fmt)

    def check(self, out_features: int, in_features: int) -> None:
        """Any shape: a last partial 128x128 block is allowed (scales are ceil(out/128) x
        ceil(in/128), as DeepSeek-V3 stores them)."""
        if out_features < 1 or in_features < 1:
            raise LowbitError(f"{self.name}: empty weight ({out_features}x{in_features})")

    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params:
        check_finite(w_full)
        if self.granularity != "tensor":
            return {}
        return {"scale": _amax_scale(w_full.detach().float().abs().max().reshape(1, 1), self.vmax)}

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        check_finite(w)
        wf = w.detach().float()
        rows = wf.shape[0]
        if self.granularity == "tensor":
            scale = (ctx or {}).get("scale")
            if scale is None:
                scale = _amax_scale(wf.abs().max().reshape(1, 1), self.vmax)
            scale = scale.reshape(1, 1).expand(rows, 1).clone()
        elif self.granularity == "channel":
            scale = _amax_scale(wf.abs().amax(1, keepdim=True), self.vmax)
        else:
            am = wf.abs().amax(1)
            am = torch.nn.functional.pad(am, (0, -rows % FP8_BLOCK)).view(-1, FP8_BLOCK).amax(1)
            scale = _amax_scale(am, self.vmax).repeat_interleave(FP8_BLOCK)[:rows, None]
        return {"scale": scale}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        return encode(x.detach().float() / params["scale"], self.fmt, saturate=True)[0]

    def saturated(self, x: Tensor, params: Params) -> Tensor:
        return minifloat_overflow(x.detach().float() / params["scale"], self.fmt)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return decode(codes, self.fmt) * params["scale"]

    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]:
        scales = params["scale"]
        if self.granularity == "tensor" and (one := one_value(scales)) is not None:
            return {"scales": one.reshape(1, 1)}
        if self.granularity == "block":
            blocks = scales[::FP8_BLOCK]
            if torch.equal(blocks.repeat_interleave(FP8_BLOCK, 0)[: shape[0]], scales):
                return {"scales": blocks}
        return {"scales": scales}

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params:
        out_f, in_f = shape
        s = tensors["scales"].float()
        if self.granularity == "block" and s.shape[0] != out_f:
            s = s.repeat_interleave(FP8_BLOCK, 0)[:out_f]
        n_groups = math.ceil(in_f / FP8_BLOCK) if self.granularity == "block" else 1
        return {"scale": s.expand(out_f, n_groups).clone()}

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        if self.granularity == "tensor":
            n_scales = 1
        elif self.granularity == "channel":
            n_scales = out_features
        else:
            n_scales = math.ceil(out_features / FP8_BLOCK) * math.ceil(in_features / FP8_BLOCK)
        return 8 + 32 * n_scales / (out_features * in_features)


class Fp4Grid(GridBase):
    """E2M1 elements, one fp16 scale per ``group`` columns = amax / 6 rounded up (``fp4-g32``)."""

    code_bits = 4
    allowed_groups = FP4_GROUPS
    group_keys = ("scale",)

    def __init__(self, group: int = 32) -> None:
        if group not in FP4_GROUPS:
            raise LowbitError(f"fp4 group sizes: {', '.join(map(str, FP4_GROUPS))}; not {group}")
        self.group_size = group
        self.name = f"fp4-g{group}"

    def check(self, out_features: int, in_features: int) -> None:
        if in_features % self.group_size:
            raise LowbitError(
                f"{self.name}: group {self.group_size} does not divide the input dimension "
                f"{in_features}; fp4 groups that do: {divisors_message(in_features, FP4_GROUPS)}"
            )
        super().check(out_features, in_features)

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        check_finite(w)
        amax = w.detach().float().abs().amax(1, keepdim=True)
        return {"scale": _fp16_up(_amax_scale(amax, E2M1_MAX))}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        return encode(x.detach().float() / params["scale"], E2M1, saturate=True)[0]

    def saturated(self, x: Tensor, params: Params) -> Tensor:
        return minifloat_overflow(x.detach().float() / params["scale"], E2M1)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return decode(codes, E2M1) * params["scale"]

    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]:
        return {"scales": fp16_if_exact(params["scale"])}

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params:
        return {"scale": tensors["scales"].float()}

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return 4 + 16 / self.group_size


MX_NAMES = {
    "mxfp4": "fp4_e2m1",
    "mxfp6-e3m2": "fp6_e3m2",
    "mxfp6-e2m3": "fp6_e2m3",
    "mxfp8-e4m3": "fp8_e4m3",
    "mxfp8-e5m2": "fp8_e5m2",
    "mxint8": "int8",
}


class MxGrid(GridBase):
    """OCP MX v1.0: blocks of 32 share an E8M0 scale 2^(floor(log2 amax) - emax_elem).

    ``scale_rounding="ceil"`` (scheme suffix ``-ceil``) picks the smallest power of two that
    keeps the block maximum in range instead: no saturation, half the resolution where it
    differs. ``"mse"`` (``-mse``) keeps, per block, whichever of the two gives the smaller
    squared error (weighted by the Hessian diagonal when one is given). Same E8M0 codes on
    disk in every case.
    """

    group_size = MX_BLOCK
    allowed_groups = (MX_BLOCK,)
    group_keys = ("exp", "scale_code")

    def __init__(self, name: str = "mxfp4", scale_rounding: str = "floor") -> None:
        if name not in MX_NAMES:
            raise LowbitError(f"MX formats: {', '.join(MX_NAMES)}; not {name!r}")
        if scale_rounding not in ("floor", "ceil", "mse"):
            raise LowbitError(f"MX scale rounding: floor (the OCP rule), ceil or mse; not "
                              f"{scale_rounding!r}")
        self.scale_rounding = scale_rounding
        self.name = name + ("" if scale_rounding == "floor" else f"-{scale_rounding}")
        self.elem = MX_NAMES[name]
        self.fmt = ELEMENTS[self.elem]
        self.code_bits = 8 if self.fmt is None else self.fmt.bits
        self.signed_codes = self.fmt is None

    def check(self, out_features: int, in_features: int) -> None:
        if in_features % MX_BLOCK:
            raise LowbitError(
                f"{self.name}: the OCP MX block of {MX_BLOCK} does not divide the input "
                f"dimension {in_features}; MX formats need a multiple of {MX_BLOCK}"
            )
        super().check(out_features, in_features)

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        check_finite(w)
        amax = w.detach().abs().amax(1, keepdim=True)
        if self.scale_rounding == "mse":
            exp = mx_scale_exponents(amax, self.elem, "floor")
            up = (exp + 1).clamp(max=E8M0_BIAS)
            cw = torch.ones(1) if weight is None else weight.detach().double().clamp(min=0)
            err = [((self._round_trip(w, e) - w.double()) ** 2 * cw).sum(1, keepdim=True)
                   for e in (exp, up)]
            exp = torch.where(err[1] < err[0], up, exp)
        else:
            exp = mx_scale_exponents(amax, self.elem, self.scale_rounding)
        return {"exp": exp, "scale_code": (exp + E8M0_BIAS).to(torch.uint8)}

    def _round_trip(self, x: Tensor, exp: Tensor) -> Tensor:
        """x rounded onto the grid of shared exponents ``exp`` (float64)."""
        params = {"exp": exp, "scale_code": (exp + E8M0_BIAS).to(torch.uint8)}
        return self.decode(self.encode(x, params), params).double()

    def _scaled(self, x: Tensor, params: Params) -> Tensor:
        return x.detach().to(torch.float64) * torch.exp2(-params["exp"].to(torch.float64))

    def encode(self, x: Tensor, params: Params) -> Tensor:
        v = self._scaled(x, params)
        if self.fmt is None:
            k = v * (1 << INT8_FRAC_BITS)
            return torch.round(k).clamp(-127, 127).to(torch.int8)
        return encode(v, self.fmt, saturate=True)[0]

    def saturated(self, x: Tensor, params: Params) -> Tensor:
        v = self._scaled(x, params)
        if self.fmt is None:
            return (v * (1 << INT8_FRAC_BITS)).abs() > 127.5
        return minifloat_overflow(v, self.fmt)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        if self.fmt is None:
            elems = codes.to(torch.float64) / (1 << INT8_FRAC_BITS)
        else:
            elems = decode(codes, self.fmt).to(torch.float64)
        return (elems * decode(params["scale_code"], E8M0).to(torch.float64)).to(torch.float32)

    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]:
        return {"scale_codes": params["scale_code"]}

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params:
        codes = tensors["scale_codes"]
        return {"exp": codes.to(torch.int64) - E8M0_BIAS, "scale_code": codes}

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.code_bits + 8 / MX_BLOCK


class Nvfp4Grid(GridBase):
    """NVFP4: E2M1 elements, an E4M3 scale per 16, an fp32 tensor scale g = amax / (448 * 6)."""

    name = "nvfp4"
    code_bits = 4
    group_size = NVFP4_BLOCK
    allowed_groups = (NVFP4_BLOCK,)
    group_keys = ("scale_code",)
    stackable = False  # the fp32 tensor scale spans the whole weight

    def check(self, out_features: int, in_features: int) -> None:
        if in_features % NVFP4_BLOCK:
            raise LowbitError(
                f"nvfp4: the block of {NVFP4_BLOCK} does not divide the input dimension "
                f"{in_features}; NVFP4 needs a multiple of {NVFP4_BLOCK}"
            )
        super().check(out_features, in_features)

    @staticmethod
    def _tensor_scale(w: Tensor) -> Tensor:
        amax = float(w.detach().abs().max()) if w.numel() else 0.0
        return torch.tensor(amax / (E4M3_MAX * E2M1_MAX) if amax > 0 else 1.0, dtype=torch.float32)

    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params:
        check_finite(w_full)
        return {"tensor_scale": self._tensor_scale(w_full)}

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        """Block scale e4m3(amax / (6 g)); without ``ctx`` g comes from w alone."""
        check_finite(w)
        g = (ctx or {}).get("tensor_scale")
        if g is None:
            g = self._tensor_scale(w)
        amax = w.detach().to(torch.float64).abs().amax(1, keepdim=True)
        scale_code, _ = encode(amax / (E2M1_MAX * g.double()), E4M3, saturate=True)
        return {"tensor_scale": g, "scale_code": scale_code}

    def _block_scale(self, params: Params) -> Tensor:
        s = decode(params["scale_code"], E4M3).to(torch.float64)
        return s * params["tensor_scale"].double()

    def _scaled(self, x: Tensor, params: Params) -> Tensor:
        denom = self._block_scale(params)
        ok = denom > 0
        return torch.where(ok, x.detach().to(torch.float64) / torch.where(ok, denom, 1.0), 0.0)

    def encode(self, x: Tensor, params: Params) -> Tensor:
        return encode(self._scaled(x, params), E2M1, saturate=True)[0]

    def saturated(self, x: Tensor, params: Params) -> Tensor:
        return minifloat_overflow(self._scaled(x, params), E2M1)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        elems = decode(codes, E2M1).to(torch.float64)
        return (elems * self._block_scale(params)).to(torch.float32)

    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]:
        ts = params["tensor_scale"].reshape(1).float()
        return {"scale_codes": params["scale_code"], "tensor_scale": ts}

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params:
        return {"tensor_scale": tensors["tensor_scale"].float().reshape(()),
                "scale_code": tensors["scale_codes"]}

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return 4 + 8 / NVFP4_BLOCK + 32 / (out_features * in_features)
