"""compressed-tensors' preset scheme names (``W4A16``, ``W8A8``, ``FP8_DYNAMIC``, ``NVFP4A16`` ...),
the names llm-compressor users type, translated into lowbit's own.

The translation is read from ``compressed_tensors.quantization.quant_scheme.PRESET_SCHEMES``
itself, so a preset means exactly what its ``QuantizationArgs`` say: bits, integer or float,
group size, symmetry, and whether activations are quantized. Weight-only presets become weight
grids (``W4A16`` -> ``w4g128``); presets that also quantize activations become a scheme of the
``w8a8`` method (``W8A8`` -> ``w8a8``, ``FP8_DYNAMIC`` -> ``w8a8-fp8``). Presets lowbit cannot
run (4-bit activations, FP8 blocks ...) are refused in one line naming the nearest preset that
it can.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

from lowbit.errors import LowbitError


class Preset(NamedTuple):
    method: str | None  # None: any rounder; "w8a8": the activation-quantizing replacer
    scheme: str  # lowbit's scheme name


def _weights(w) -> str | None:
    """lowbit's grid name for a preset's weight QuantizationArgs, None if there is none."""
    strategy = str(getattr(w.strategy, "value", w.strategy))
    kind = str(getattr(w.type, "value", w.type))
    if kind == "int":
        sym = "" if w.symmetric else "-asym"
        if strategy == "group":
            return f"w{w.num_bits}g{w.group_size}{sym}"
        if strategy == "channel":
            return f"w{w.num_bits}{sym}"
        if strategy == "tensor":
            return f"w{w.num_bits}-tensor{sym}"
        return None
    if kind == "float":
        if w.num_bits == 4 and strategy == "tensor_group" and w.group_size == 16:
            return "nvfp4"
        if strategy == "group" and w.group_size == 32:  # OCP MX: E8M0 scale per 32
            return {4: "mxfp4", 6: "mxfp6-e2m3", 8: "mxfp8-e4m3"}.get(w.num_bits)
        if w.num_bits == 8 and strategy in ("channel", "tensor"):
            return "fp8-e4m3" if strategy == "channel" else "fp8-e4m3-tensor"
    return None


def _activations(w, a) -> str | None:
    """lowbit's w8a8 scheme for a preset that quantizes activations, None if it has none."""
    kind = str(getattr(a.type, "value", a.type))
    wkind = str(getattr(w.type, "value", w.type))
    strategy = str(getattr(a.strategy, "value", a.strategy))
    wstrategy = str(getattr(w.strategy, "value", w.strategy))
    if a.num_bits != 8 or w.num_bits != 8 or kind != wkind or wstrategy == "block":
        return None
    suffix = "" if a.dynamic else "-static"
    if a.dynamic and strategy != "token":
        return None
    if kind == "int" and w.symmetric and a.symmetric:
        return "w8a8" + suffix
    if kind == "float":
        return "w8a8-fp8" + suffix
    return None


@cache
def presets() -> dict[str, Preset | str]:
    """Every compressed-tensors preset name: its Preset, or why lowbit refuses it."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    out: dict[str, Preset | str] = {}
    for name, spec in PRESET_SCHEMES.items():
        w, a = spec.get("weights"), spec.get("input_activations")
        if w is None:
            out[name] = "it quantizes nothing"
            continue
        if a is None:
            grid = _weights(w)
            out[name] = Preset(None, grid) if grid else f"lowbit has no grid for its weights ({w})"
            continue
        scheme = _activations(w, a)
        if scheme:
            out[name] = Preset("w8a8", scheme)
        else:
            kind = str(getattr(a.type, "value", a.type))
            out[name] = (f"it quantizes activations to {a.num_bits}-bit {kind}; lowbit quantizes "
                         "activations only as W8A8 (W8A8, INT8, FP8, FP8_DYNAMIC)")
    return out


def preset(name: str) -> Preset | None:
    """The Preset of a compressed-tensors preset name (exact, upper case as the library spells
    it); None if ``name`` is not a preset; LowbitError for presets lowbit cannot run."""
    if name not in presets():
        return None
    p = presets()[name]
    if isinstance(p, str):
        a16 = [n for n, q in presets().items() if isinstance(q, Preset) and q.method is None]
        raise LowbitError(f"preset {name}: {p}; weight-only presets: {', '.join(a16)}")
    return p
