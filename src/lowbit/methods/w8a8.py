"""Weight-and-activation 8-bit runtime replacers: W8A8 (int8 or FP8) and LLM.int8().

``w8a8`` replaces each targeted Linear by a ``W8A8Linear``: int8 per-channel weights times int8
activations, dynamic per token (``w8a8``) or with one static per-tensor scale calibrated from
the layer's observed input range (``w8a8-static``); ``w7a8`` / ``w7a8-static`` keep weight
codes within +-64, which this AVX2 CPU's fast oneDNN int8 GEMM multiplies exactly (see
``lowbit.runtime.int8``). ``w8a8-fp8`` / ``w8a8-fp8-static``: ``FP8Linear``, E4M3 weights per
channel and activations per token, or one static scale per tensor from Transformer Engine's
delayed scaling over the calibration batches (``lowbit.runtime.fp8``). Put ``smoothquant``
before it for SmoothQuant W8A8.

``llm-int8`` replaces each Linear by ``Int8MixedLinear`` (Dettmers et al.): input columns whose
|x| exceeds ``threshold`` are multiplied in full precision, the rest in int8.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.formats.presets import preset
from lowbit.methods.base import Replacer, register
from lowbit.runtime.fp8 import FP8Linear
from lowbit.runtime.int8 import KERNELS
from lowbit.runtime.int8_mixed import Int8MixedLinear
from lowbit.runtime.w8a8 import W8A8Linear

# scheme -> (activations, weight code limit; 0 = FP8 E4M3)
W8A8_SCHEMES = {
    "w8a8": ("dynamic", 127),
    "w8a8-static": ("static", 127),
    "w7a8": ("dynamic", 64),
    "w7a8-static": ("static", 64),
    "w8a8-fp8": ("dynamic", 0),
    "w8a8-fp8-static": ("static", 0),
}


FP8_KERNELS = ("auto", "scaled_mm", "emulate")


def _check_kernel(step: str, kernel: str, allowed: tuple[str, ...] = KERNELS) -> None:
    if kernel not in allowed:
        raise LowbitError(f"{step}: kernel must be one of {', '.join(allowed)}, not {kernel!r}")


@register
@dataclass(frozen=True)
class W8A8(Replacer):
    step = "w8a8"
    scheme: str = "w8a8"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        p = preset(self.scheme.strip()) if self.scheme not in W8A8_SCHEMES else None
        if p is not None and p.method == self.step:  # W8A8, INT8, FP8, FP8_DYNAMIC
            object.__setattr__(self, "scheme", p.scheme)
        if self.scheme not in W8A8_SCHEMES:
            raise LowbitError(f"w8a8 takes the schemes {', '.join(W8A8_SCHEMES)} and the presets "
                              f"W8A8, INT8, FP8, FP8_DYNAMIC, not {self.scheme!r}")
        _check_kernel(self.step, self.kernel, FP8_KERNELS if self.fp8 else KERNELS)

    @property
    def act(self) -> str:
        return W8A8_SCHEMES[self.scheme][0]

    @property
    def fp8(self) -> bool:
        return W8A8_SCHEMES[self.scheme][1] == 0

    def wants(self) -> frozenset[str]:
        return frozenset({"absmax"}) if self.act == "static" and not self.fp8 else frozenset()

    def needs_data(self) -> bool:
        return self.act == "static"

    def make(self, w, bias, stats):
        if self.fp8:
            kernel = "scaled_mm" if self.kernel == "auto" else self.kernel
            mod = FP8Linear.from_linear(w.float(), bias, self.act, kernel=kernel)
            if self.act == "static":
                mod.start_calibration()
            return mod, {"kernel": mod.kernel}
        x_absmax = None if stats is None else float(stats.absmax.max())
        mod = W8A8Linear.from_linear(w.float(), bias, self.act, x_absmax,
                                     W8A8_SCHEMES[self.scheme][1], self.kernel)
        return mod, {"x_absmax": x_absmax, "kernel": mod.int8_weight().kernel}

    def finish(self, module) -> dict:
        if self.fp8 and self.act == "static":
            module.finish_calibration()
            row = {"x_scale": float(module.x_scale), "saturated": module.saturated}
            module.saturated = 0
            return row
        return {}


@register
@dataclass(frozen=True)
class LLMInt8(Replacer):
    step = "llm-int8"
    threshold: float = 6.0
    kernel: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold > 0:
            raise LowbitError(f"llm-int8: threshold must be positive, not {self.threshold}")
        _check_kernel(self.step, self.kernel)

    def make(self, w, bias, stats):
        mod = Int8MixedLinear.from_linear(w.float(), bias, self.threshold, self.kernel)
        return mod, {"threshold": self.threshold, "kernel": mod.int8_weight().kernel}
