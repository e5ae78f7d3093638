"""FP8 W8A8 runtime: FP8 weights (one scale per output channel) times FP8 activations, as
real ``torch.float8_*`` tensors multiplied by ``torch._scaled_mm`` (which torch runs on CPU).

Activations are scaled per token (dynamic: each row's absmax maps to the format's largest
value) or per tensor (static). Static scales come from delayed scaling as Transformer Engine
does it: each call quantizes with the scale computed from the amax history of the calls
*before* it, then records its own amax; the history keeps the last ``history_len`` values and
the scale is ``max(history) * 2**margin / fmt_max``. After calibration the history is frozen.

On this CPU ``_scaled_mm`` is as fast as the fp32 GEMM, not faster (no FP8 arithmetic units):
FP8 here is about accuracy and the checkpoint format, not speed.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime.qlinear import QuantModule

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
ACT_MODES = ("dynamic", "static")


def _fmt(fmt: str) -> str:
    if fmt not in FP8_DTYPES:
        raise LowbitError(f"FP8 format must be one of {', '.join(FP8_DTYPES)}, not {fmt!r}")
    return fmt


def to_fp8(x: torch.Tensor, scale: torch.Tensor | float, fmt: str = "e4m3") -> torch.Tensor:
    """``x / scale`` saturated to the format's range, rounded to nearest even."""
    m = FP8_MAX[_fmt(fmt)]
    return (x.float() / scale).clamp_(-m, m).to(FP8_DTYPES[fmt])


def quantize_rows_fp8(x: torch.Tensor, fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per output channel / per token) scaling: (fp8 codes, fp32 scales (rows,))."""
    if not torch.isfinite(x).all():
        raise LowbitError("non-finite values cannot be quantized to FP8")
    amax = x.detach().abs().amax(-1).float()
    s = torch.where(amax > 0, amax / FP8_MAX[_fmt(fmt)], torch.ones_like(amax))
    return to_fp8(x, s[:, None], fmt), s


class DelayedScaling:
    """Transformer Engine's delayed scaling of one tensor: the scale used now comes from the
    amax values seen before (the first call, with no history, uses scale 1)."""

    def __init__(self, fmt: str = "e4m3", history_len: int = 1024, margin: int = 0) -> None:
        if history_len < 1:
            raise LowbitError(f"amax history length must be at least 1, not {history_len}")
        self.fmt, self.history_len, self.margin = _fmt(fmt), history_len, margin
        self.history: list[float] = []

    def scale(self) -> float:
        if not self.history or max(self.history) <= 0:
            return 1.0
        return max(self.history) * 2.0**self.margin / FP8_MAX[self.fmt]

    def record(self, amax: float) -> None:
        self.history.append(float(amax))
        del self.history[: -self.history_len]


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
               kernel: str = "scaled_mm") -> torch.Tensor:
    """(a * sa) @ (b * sb)^T in fp32 for fp8 ``a`` (m, k), ``b`` (n, k) and fp32 scales
    ``sa`` (m, 1) or (), ``sb`` (1, n) or (). ``emulate`` computes the same product with
    the fp32 GEMM on the decoded values (a reference for tests)."""
    if kernel == "scaled_mm":
        if sa.dim() != sb.dim():  # _scaled_mm takes both scales per tensor or both per row
            sa = sa.expand(a.shape[0], 1) if sa.dim() == 0 else sa
            sb = sb.expand(1, b.shape[0]) if sb.dim() == 0 else sb
        return torch._scaled_mm(a, b.t(), scale_a=sa.float().contiguous(),
                                scale_b=sb.float().contiguous(), out_dtype=torch.float32)
    if kernel == "emulate":
        bf = b.float() * (sb.reshape(-1, 1) if sb.dim() else sb)
        return (a.float() * sa) @ bf.t()
    raise LowbitError(f"FP8 kernel must be scaled_mm or emulate, not {kernel!r}")


class FP8Linear(QuantModule):
    """A Linear computed from FP8 weights and FP8 activations (see the module docstring)."""

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, act: str = "dynamic",
                 x_scale: float | None = None, fmt: str = "e4m3",
                 kernel: str = "scaled_mm") -> None:
        super().__init__()
        if act not in ACT_MODES:
            raise LowbitError(f"FP8 activation scaling must be dynamic or static, not {act!r}")
        self.fmt, self.act, self.kernel = _fmt(fmt), act, kernel
        if qweight.dtype != FP8_DTYPES[fmt]:
            raise LowbitError(f"FP8 {fmt} weights must be {FP8_DTYPES[fmt]}, not {qweight.dtype}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("w_scale", w_scale.detach().float().reshape(-1).clone())
        xs = 0.0 if x_scale is None else float(x_scale)
        self.register_buffer("x_scale", torch.tensor([xs], dtype=torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)
        self.delayed: DelayedScaling | None = None  # set while calibrating a static scale
        self.saturated = 0  # activation elements clipped at the format's largest value

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    act: str = "dynamic", fmt: str = "e4m3",
                    kernel: str = "scaled_mm") -> FP8Linear:
        q, s = quantize_rows_fp8(weight.float(), fmt)
        return cls(q, s, bias, act, None, fmt, kernel)

    def start_calibration(self, history_len: int = 1024, margin: int = 0) -> None:
        """Static mode: run calibration batches through, then ``finish_calibration``."""
        self.delayed = DelayedScaling(self.fmt, history_len, margin)

    def finish_calibration(self) -> None:
        if self.delayed is None or not self.delayed.history:
            raise LowbitError("FP8 static calibration saw no inputs")
        self.x_scale.fill_(self.delayed.scale())
        self.delayed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        m = FP8_MAX[self.fmt]
        if self.act == "dynamic":
            xq, sx = quantize_rows_fp8(x2, self.fmt)
            sx = sx[:, None]
        else:
            if self.delayed is not None:
                scale = self.delayed.scale()
                self.delayed.record(float(x2.abs().amax()))
            elif float(self.x_scale) > 0:
                scale = float(self.x_scale)
            else:
                raise LowbitError("static FP8 activations need a calibrated scale")
            self.saturated += int((x2.abs() > m * scale).sum())
            xq, sx = to_fp8(x2, scale, self.fmt), torch.tensor(scale)
        y = fp8_matmul(xq, self.qweight, sx, self.w_scale[None, :], self.kernel)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.w_scale[:, None]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "w_scale": self.w_scale, "x_scale": self.x_scale}

    def layer_info(self) -> dict:
        return {"kind": "w8a8-fp8", "shape": [self.out_features, self.in_features],
                "act": self.act, "fmt": self.fmt, "kernel": self.kernel}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, fp8={self.fmt}, "
                f"act={self.act}, kernel={self.kernel}")
