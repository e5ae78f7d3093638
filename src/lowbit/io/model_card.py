"""The README.md model card written into an exported checkpoint: what was done, to what,
with which calibration text, and what was measured (only numbers lowbit.json records)."""

from __future__ import annotations

import json

LOADERS = {
    "compressed-tensors": "vLLM, SGLang and transformers (with `compressed-tensors` installed)",
    "gptq": "vLLM (gptq / gptq_marlin), SGLang, transformers (with optimum + gptqmodel)",
    "awq": "vLLM (awq / awq_marlin), SGLang, transformers (with gptqmodel)",
}


def _num(x, spec: str = ".3f") -> str:
    return "not measured" if x is None else format(x, spec)


def model_card(fmt: str, scheme, meta: dict, qcfg: dict) -> str:
    cal = meta.get("calibration") or {}
    ev = meta.get("eval") or {}
    if hasattr(scheme, "act"):  # W8A8
        what = (f"{scheme.name}: int8 weights per output channel, int8 activations "
                f"({'dynamic per token' if scheme.act == 'dynamic' else 'static per tensor'})")
    elif not hasattr(scheme, "bits"):  # a float grid (fp8-e4m3, nvfp4 ...)
        what = f"{scheme.name}: floating-point elements (see the quantization config below)"
    else:
        gran = (f"groups of {scheme.group_size}" if scheme.granularity == "group"
                else f"per {scheme.granularity}")
        what = (f"{scheme.name}: {scheme.bits}-bit integer, {gran}, "
                f"{'symmetric' if scheme.symmetric else 'asymmetric'}, {scheme.clip} range")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [lowbit, quantized, " + fmt + "]",
        "---",
        "",
        f"# {meta.get('base_model', 'model')} — {meta.get('method', '?')} {scheme.name} "
        f"({fmt})",
        "",
        f"Quantized with [lowbit](https://example.invalid/lowbit) and written in the {fmt} "
        f"layout, which {LOADERS[fmt]} load.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {meta.get('base_model', 'unknown')} |",
        f"| method | {meta.get('method', 'unknown')} |",
        f"| scheme | {what} |",
        f"| bits per weight (quantized Linears) | {_num(meta.get('bits_per_weight'))} |",
        f"| recipe | {json.dumps(meta.get('recipe', {}))} |",
    ]
    if cal:
        lines.append(
            f"| calibration | {cal.get('source')}: {cal.get('windows')} windows of "
            f"{cal.get('seq_len')} tokens from window {cal.get('offset')} |"
        )
    else:
        lines.append("| calibration | none (round-to-nearest) |")
    lines += [
        f"| perplexity | {_num(ev.get('ppl'))} |",
        f"| KL to base (mean) | {_num(ev.get('kl_mean'), '.4f')} |",
    ]
    if ev:
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
