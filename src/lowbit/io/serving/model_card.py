"""The README.md model card written into an exported checkpoint: what was done, to what,
with which calibration text, and what was measured (only numbers lowbit.json records)."""

from __future__ import annotations

import json
import re

from lowbit.formats.grid_base import WeightGrid
from lowbit.formats.integer import IntGrid
from lowbit.io.serving.base import W8A8_SCHEMES
from lowbit.models import BUILTIN_HUB_IDS, is_hub_id

LOADERS = {
    "compressed-tensors": "vLLM, SGLang and transformers (with `compressed-tensors` installed)",
    "gptq": "vLLM (gptq / gptq_marlin), SGLang, transformers (with optimum + gptqmodel)",
    "awq": "vLLM (awq / awq_marlin), SGLang, transformers (with gptqmodel)",
}


def _num(x, spec: str = ".3f") -> str:
    return "not measured" if x is None else format(x, spec)


def describe_scheme(grid: WeightGrid | str) -> str:
    """One line on the number format: a WeightGrid, or a W8A8 scheme name (``w8a8``,
    ``w8a8-static``: W8A8 modules have no grid)."""
    if isinstance(grid, str):
        act = W8A8_SCHEMES.get(grid, "dynamic")
        return (f"{grid}: int8 weights per output channel, int8 activations "
                f"({'dynamic per token' if act == 'dynamic' else 'static per tensor'})")
    if not isinstance(grid, IntGrid):  # a float grid (fp8-e4m3, nvfp4 ...)
        return f"{grid.name}: floating-point elements (see the quantization config below)"
    gran = (f"groups of {grid.group}" if grid.granularity == "group"
            else f"per {grid.granularity}")
    return (f"{grid.name}: {grid.bits}-bit integer, {gran}, "
            f"{'symmetric' if grid.symmetric else 'asymmetric'}, {grid.clip} range")


def _recipe(meta: dict) -> str:
    """The recipe for a table cell: each step of ``{"steps": [...]}`` (lowbit.json v2) as
    ``name {options}``, in order; an older record as JSON."""
    recipe = meta.get("recipe")
    if isinstance(recipe, dict) and isinstance(recipe.get("steps"), list) and recipe["steps"]:
        parts = []
        for st in recipe["steps"]:
            if isinstance(st, dict) and "step" in st:
                opts = {k: v for k, v in st.items() if k != "step"}
                parts.append(f"{st['step']} {json.dumps(opts)}")
            else:
                parts.append(json.dumps(st))
        text = " -> ".join(parts)
    else:
        text = json.dumps(recipe or {})
    return text.replace("|", "\\|")  # a regex target must not end the table cell




def hub_base(base: str | None) -> str | None:
    """The Hub id a card's ``base_model:`` may name: a built-in's id, an ``org/name`` argument
    that is not a local path, or the Hub snapshot a path points into; None for local models."""
    if not base:
        return None
    if base in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[base]
    if m := re.search(r"models--([^/]+?)--([^/]+)/snapshots/", base):
        return f"{m.group(1)}/{m.group(2)}"
    if is_hub_id(base):
        return base
    return None


def front_matter(fmt: str, meta: dict) -> list[str]:
    """The YAML header the Hub reads: base model and its relation, library, tags."""
    lines = ["---"]
    if base := hub_base(meta.get("base_model")):
        lines += [f"base_model: {base}", "base_model_relation: quantized"]
    lines += ["library_name: transformers", "pipeline_tag: text-generation",
              f"tags: [lowbit, quantized, {fmt}, {meta.get('method', 'unknown')}]", "---"]
    return lines


def _kv_row(fmt: str, kv: dict, qcfg: dict) -> str:
    if qcfg.get("kv_cache_scheme"):
        return (f"{kv['format']}: float8 E4M3 with static scales per layer"
                f"{' and KV head' if 'head' in kv['format'] else ''} in the checkpoint "
                "(`kv_cache_scheme`, `self_attn.k_scale`/`v_scale`); vLLM: "
                "`--kv-cache-dtype fp8`")
    return (f"{kv['format']} (lowbit's cache, chosen at quantization; not carried by this "
            "checkpoint)")


def model_card(fmt: str, grid: WeightGrid | str, meta: dict, qcfg: dict,
               counts: dict[str, int] | None = None) -> str:
    """``grid``: the weights' grid (or W8A8 scheme name), the most frequent one when
    ``counts`` (layers per scheme name) holds several; ``meta``: lowbit.json's description
    (``method`` such as ``awq+gptq``, ``recipe`` ``{"steps": [...]}``, ``calibration``,
    ``eval``, ``bits_per_weight``)."""
    cal = meta.get("calibration") or {}
    ev = meta.get("eval") or {}
    name = grid if isinstance(grid, str) else grid.name
    what = describe_scheme(grid)
    if counts and len(counts) > 1:  # mixed precision: each scheme and its number of layers
        name = "mixed " + "/".join(counts)
        what = "mixed precision: " + ", ".join(
            f"{n} layers {s}" for s, n in sorted(counts.items(), key=lambda t: -t[1])) + \
            f" (most: {what})"
    lines = [
        *front_matter(fmt, meta),
        "",
        f"# {meta.get('base_model', 'model')} — {meta.get('method', '?')} {name} "
        f"({fmt})",
        "",
        f"Quantized with lowbit and written in the {fmt} layout, which {LOADERS[fmt]} load.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {meta.get('base_model', 'unknown')} |",
        f"| method | {meta.get('method', 'unknown')} |",
        f"| scheme | {what} |",
        f"| bits per weight (quantized Linears) | {_num(meta.get('bits_per_weight'))} |",
        f"| recipe | {_recipe(meta)} |",
    ]
    if cal:
        lines.append(
            f"| calibration | {cal.get('source')}: {cal.get('windows')} windows of "
            f"{cal.get('seq_len')} tokens from window {cal.get('offset')} |"
        )
    else:
        lines.append("| calibration | none (round-to-nearest) |")
    kv = meta.get("kv_cache")
    if kv:
        lines.append(f"| KV cache | {_kv_row(fmt, kv, qcfg)} |")
    if ev:  # only what was measured: no placeholder numbers
        lines += [f"| perplexity | {_num(ev.get('ppl'))} |"]
        if ev.get("kl_mean") is not None:
            lines.append(f"| KL to base (mean) | {ev['kl_mean']:.4f} |")
        lines.append(f"| evaluation | {ev.get('data', '?')}: {ev.get('windows', '?')} windows of "
                     f"{ev.get('seq_len', '?')} tokens |")
    lines += [
        "",
        "Quantization config:",
        "",
        "```json",
        json.dumps(qcfg, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)
