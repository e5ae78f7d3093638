"""Integer building blocks of the W8A8 and LLM.int8() runtimes: symmetric int8 quantization of
weights (per output channel) and activations (per token, or per tensor with a fixed scale),
and an int8 x int8 -> int32 matrix product with a choice of kernels.

Kernels (``int8_matmul``):

- ``onednn``: oneDNN's u8s8 GEMM (``torch.ops.onednn.qlinear_pointwise``). On CPUs without
  VNNI (AVX2 only, like the benchmark machine) it multiplies pairs of bytes into *saturating*
  int16 sums after shifting the int8 activations by +128; the product is exact only when every
  weight code has |q| <= 64 (255 * 64 * 2 < 32767). Weights outside that range are refused.
- ``int_mm``: ``torch._int_mm`` (int32 accumulation, exact for any int8 codes). On this CPU
  it is a slow reference kernel (tens of times slower than the fp32 GEMM).
- ``emulate``: the same integer product computed by the fp32 GEMM on the integer values (exact
  while partial sums stay below 2^24, otherwise correct to fp32 rounding). Not an int8 kernel:
  for evaluating accuracy where no fast int8 kernel covers the codes.
- ``auto``: ``onednn`` when the codes allow it, else ``int_mm``.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

KERNELS = ("auto", "onednn", "int_mm", "emulate")
ONEDNN_WMAX = 64  # largest |weight code| the AVX2 u8s8 kernel multiplies without saturation


def quantize_weight_int8(w: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric codes in [-qmax, qmax] (int8) and fp32 scales (out,)."""
    if not 1 <= qmax <= 127:
        raise LowbitError(f"int8 weight range must be 1..127, not {qmax}")
    w = w.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-12) / qmax
    q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def quantize_tokens_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) symmetric int8 codes of a 2-D input and the fp32 scales (rows,)."""
    x = x.float()
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1).clamp_(min=1e-12).div_(127.0)
    q = torch.mul(x, scale.reciprocal()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_static_int8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Codes of a 2-D input with one fixed per-tensor scale (values beyond the range clip)."""
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)


def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")


def pick_kernel(kernel: str, wq: torch.Tensor) -> str:
    """Resolve ``auto`` and check that the kernel can multiply these weight codes exactly."""
    if kernel not in KERNELS:
        raise LowbitError(f"unknown int8 kernel {kernel!r}; known: {', '.join(KERNELS)}")
    fits = int(wq.abs().max()) <= ONEDNN_WMAX if wq.numel() else True
    if kernel == "auto":
        return "onednn" if fits and onednn_available() else "int_mm"
    if kernel == "onednn":
        if not onednn_available():
            raise LowbitError("this torch build has no oneDNN int8 linear")
        if not fits:
            raise LowbitError(
                f"the onednn kernel needs weight codes within +-{ONEDNN_WMAX} "
                f"(this weight reaches {int(wq.abs().max())}); use int_mm or a 7-bit weight range"
            )
    return kernel


class Int8Weight:
    """An (out, in) int8 weight ready for one kernel (oneDNN's packed copy made once)."""

    def __init__(self, wq: torch.Tensor, kernel: str = "auto") -> None:
        self.wq = wq
        self.kernel = pick_kernel(kernel, wq)
        self._packed = None
        self._wf: torch.Tensor | None = None

    def matmul(self, xq: torch.Tensor, col_scale: torch.Tensor | None = None) -> torch.Tensor:
        """acc[t, o] = sum_i xq[t, i] * wq[o, i] as fp32 (int32 exact for int_mm / onednn),
        times ``col_scale[o]`` when given (fused into the oneDNN kernel)."""
        acc = self._matmul(xq, col_scale)
        if col_scale is not None and self.kernel != "onednn":
            acc.mul_(col_scale[None, :])
        return acc

    def _matmul(self, xq: torch.Tensor, col_scale: torch.Tensor | None) -> torch.Tensor:
        n, k = self.wq.shape
        if xq.shape[-1] != k:
            raise LowbitError(f"int8 matmul: input has {xq.shape[-1]} features, weight {k}")
        if self.kernel == "emulate":
            if self._wf is None:
                self._wf = self.wq.float()
            return xq.float() @ self._wf.T
        if self.kernel == "int_mm":
            m = xq.shape[0]
            if m <= 16:  # the kernel wants more than 16 rows: pad with zero rows
                pad = torch.zeros(17 - m, k, dtype=torch.int8)
                return torch._int_mm(torch.cat([xq, pad]), self.wq.T)[:m].float()
            return torch._int_mm(xq.contiguous(), self.wq.T).float()
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.wq.contiguous(), None)
        scale = torch.ones(n) if col_scale is None else col_scale.float().contiguous()
        zeros = torch.zeros(n, dtype=torch.int64)
        return torch.ops.onednn.qlinear_pointwise(
            xq.contiguous(), 1.0, 0, self._packed, scale, zeros, None, 1.0, 0, torch.float32,
            "none", [], "",
        )
