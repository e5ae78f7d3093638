"""Weight-and-activation int8 methods on a whole model: SmoothQuant W8A8 (Xiao et al.), naive
W8A8 without smoothing, and LLM.int8() (Dettmers et al.). Each replaces every decoder-block
Linear by a runtime int8 module (``W8A8Linear`` / ``Int8MixedLinear``) in place.

Schemes: ``w8a8`` (int8 per-channel weights, dynamic per-token int8 activations),
``w8a8-static`` (static per-tensor activation scales from calibration), and ``w7a8`` /
``w7a8-static``: weight codes within +-64, which this AVX2 CPU's fast oneDNN int8 GEMM
multiplies exactly (see ``lowbit.runtime.int8``). ``w8a8-fp8`` / ``w8a8-fp8-static``: FP8 E4M3
weights (per channel) and activations (dynamic per token, or one static scale per tensor from
Transformer Engine's delayed scaling over the calibration batches; ``lowbit.runtime.fp8``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec, block_linears, get_blocks, spec_for
from lowbit.errors import LowbitError
from lowbit.methods.fold import apply_scales, norm_feeds
from lowbit.pipeline.act_stats import ActStats, collect_act_stats
from lowbit.pipeline.driver import get_weight
from lowbit.runtime.fp8 import FP8Linear
from lowbit.runtime.int8_mixed import Int8MixedLinear
from lowbit.runtime.w8a8 import W8A8Linear

INT8_METHODS = ("smoothquant", "w8a8", "llm-int8")
W8A8_SCHEMES = {
    "w8a8": ("dynamic", 127),
    "w8a8-static": ("static", 127),
    "w7a8": ("dynamic", 64),
    "w7a8-static": ("static", 64),
    "w8a8-fp8": ("dynamic", 0),
    "w8a8-fp8-static": ("static", 0),
}


@dataclass(frozen=True)
class Int8Scheme:
    name: str
    act: str = "dynamic"  # dynamic per token or static per tensor
    weight_qmax: int = 127  # 0: FP8 E4M3 instead of int8

    @property
    def fp8(self) -> bool:
        return self.weight_qmax == 0

    def to_dict(self) -> dict:
        return {"name": self.name, "act": self.act, "weight_qmax": self.weight_qmax}


def parse_int8_scheme(method: str, scheme: str) -> Int8Scheme:
    if method == "llm-int8":
        return Int8Scheme("llm-int8", "mixed", 127)
    key = scheme.strip().lower()
    if key not in W8A8_SCHEMES:
        raise LowbitError(
            f"--method {method} takes --scheme {', '.join(W8A8_SCHEMES)}, not {scheme!r}"
        )
    act, qmax = W8A8_SCHEMES[key]
    return Int8Scheme(key, act, qmax)


@dataclass
class Int8Result:
    method: str
    scheme: Int8Scheme
    qweights: dict[str, nn.Module]  # the runtime modules, by full name
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stats: dict[str, ActStats] | None = None

    def bits_per_weight(self) -> float:
        n = sum(m.out_features * m.in_features for m in self.qweights.values())
        return 8.0 * self.storage_bytes() / max(n, 1)

    def storage_bytes(self) -> int:
        return sum(m.storage_bytes() for m in self.qweights.values())


def smooth_scales(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1-alpha); channels that never fire (or
    have no weight) keep s = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"alpha must be in [0, 1], not {alpha}")
    x, w = xmax.double(), wmax.double()
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    ok = (x > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=1e-5), torch.ones_like(s)).float()


@torch.no_grad()
def smooth_model(
    model: nn.Module, spec: ArchSpec, stats: dict[str, ActStats], alpha: float
) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into every norm -> Linears pair; return the scale applied to
    each smoothed Linear's input (by full name) so calibrated ranges can be divided by it."""
    applied = {}
    for bi, block in enumerate(get_blocks(model, spec)):
        for feed in norm_feeds(spec):
            first = f"{spec.blocks}.{bi}.{feed.group[0]}"
            xmax = stats[first].absmax
            wmax = torch.stack(
                [get_weight(block.get_submodule(n), spec).abs().amax(0) for n in feed.group]
            ).amax(0)
            s = smooth_scales(xmax, wmax, alpha)
            apply_scales(block, spec, feed, s)
            for n in feed.group:
                applied[f"{spec.blocks}.{bi}.{n}"] = s
    return applied


def _bias(mod: nn.Module) -> torch.Tensor | None:
    return None if getattr(mod, "bias", None) is None else mod.bias.data


def _replace(model: nn.Module, full: str, new: nn.Module) -> None:
    parent, child = full.rsplit(".", 1)
    setattr(model.get_submodule(parent), child, new)


@torch.no_grad()
def quantize_int8(
    model: nn.Module,
    method: str,
    scheme: str = "w8a8",
    calib: torch.Tensor | None = None,
    alpha: float = 0.5,
    threshold: float = 6.0,
    kernel: str = "auto",
    chunk: int = 8,
    progress: bool = True,
    stats: dict[str, ActStats] | None = None,
) -> Int8Result:
    """Quantize every decoder-block Linear of ``model`` in place with an int8 method."""
    if method not in INT8_METHODS:
        raise LowbitError(f"unknown int8 method {method!r}; known: {', '.join(INT8_METHODS)}")
    sch = parse_int8_scheme(method, scheme)
    spec = spec_for(model)
    if method == "smoothquant":
        norm_feeds(spec)  # fail before calibrating when the table cannot fold
    needs_stats = method == "smoothquant" or (sch.act == "static" and not sch.fp8)
    if sch.fp8 and sch.act == "static" and calib is None:
        raise LowbitError(f"{method} {sch.name} needs calibration windows")
    t0 = time.perf_counter()
    if needs_stats and stats is None:
        if calib is None:
            raise LowbitError(f"{method} {sch.name} needs calibration windows")
        stats = collect_act_stats(model, spec, calib, chunk, progress)
    applied = smooth_model(model, spec, stats, alpha) if method == "smoothquant" else {}
    res = Int8Result(method, sch, {}, stats=stats)
    blocks = get_blocks(model, spec)
    for bi, block in enumerate(tqdm(blocks, desc="int8", disable=not progress, leave=False)):
        for name, mod in block_linears(block, spec).items():
            full = f"{spec.blocks}.{bi}.{name}"
            w = get_weight(mod, spec).float()
            if method == "llm-int8":
                new = Int8MixedLinear.from_linear(w, _bias(mod), threshold, kernel)
                row = {"threshold": threshold}
            elif sch.fp8:
                new = FP8Linear.from_linear(w, _bias(mod), sch.act)
                row = {"smoothed": full in applied}
            else:
                x_absmax = None
                if sch.act == "static":
                    amax = stats[full].absmax
                    if full in applied:
                        amax = amax / applied[full]
                    x_absmax = float(amax.max())
                new = W8A8Linear.from_linear(w, _bias(mod), sch.act, x_absmax, sch.weight_qmax,
                                             kernel)
                row = {"x_absmax": x_absmax, "smoothed": full in applied}
            _replace(model, full, new)
            res.qweights[full] = new
            kern = new.kernel if sch.fp8 else new.int8_weight().kernel
            res.rows.append({"block": bi, "name": full, "shape": list(w.shape), **row,
                             "kernel": kern})
    if sch.fp8 and sch.act == "static":
        calibrate_fp8(model, res, calib, chunk, progress)
    res.seconds = time.perf_counter() - t0
    return res


@torch.no_grad()
def calibrate_fp8(model: nn.Module, res: Int8Result, calib: torch.Tensor, chunk: int,
                  progress: bool) -> None:
    """Static FP8 activation scales by delayed scaling: the calibration windows run through
    the FP8 model in chunks, each layer quantizing with the scale from the chunks before."""
    mods = res.qweights
    for m in mods.values():
        m.start_calibration()
    for i in tqdm(range(0, calib.shape[0], chunk), desc="fp8 calibration", disable=not progress,
                  leave=False):
        model(input_ids=calib[i : i + chunk])
    for row in res.rows:
        m = mods[row["name"]]
        m.finish_calibration()
        row.update({"x_scale": float(m.x_scale), "saturated": m.saturated})
        m.saturated = 0


def outlier_fractions(model: nn.Module) -> dict[str, float]:
    """Per Int8MixedLinear: the mean fraction of input columns it routed to full precision
    since its counters were last reset."""
    return {n: m.outlier_fraction for n, m in model.named_modules()
            if isinstance(m, Int8MixedLinear)}
