"""``lowbit demo``: GPTQ 4-bit on the built-in model, evaluated against the base."""

from __future__ import annotations

import time
from pathlib import Path

import click

from lowbit.cli.common import dtype_option, dump_json, format_table

# The 4-bit GPTQ scheme that measures best on the protocol (BENCHMARKS.md, issue 2 section)
DEMO_SCHEME = "w4g64-asym"
RESULT_COLS = [
    ("method", "method", ""),
    ("scheme", "scheme", ""),
    ("bpw", "bits/w", ".3f"),
    ("ppl", "ppl", ".3f"),
    ("kl_mean", "KL", ".4f"),
    ("top1", "top-1", ".3f"),
    ("size_mb", "size MB", ".1f"),
    ("seconds", "time s", ".1f"),
]


@click.command("demo")
@click.option("--model", "model_arg", default="smollm2-135m", show_default=True)
@click.option("--scheme", default=DEMO_SCHEME, show_default=True)
@click.option("--out", type=click.Path(), help="[default: out/MODEL-gptq-SCHEME]")
@click.option("--windows", default=32, show_default=True, help="evaluation windows")
@click.option("--calib-samples", default=128, show_default=True, help="calibration windows")
@click.option("--seq-len", default=512, show_default=True, help="tokens per window")
@click.option("--json", "json_path", type=click.Path())
@dtype_option()
def command(model_arg, scheme, out, windows, calib_samples, seq_len, json_path, dtype):
    """The main job: GPTQ 4-bit on the built-in model, evaluated against the base."""
    from lowbit.calib import eval_windows
    from lowbit.eval.metrics import evaluate
    from lowbit.jobs import Calibration, quantize_job
    from lowbit.models import DTYPE_NAMES, load_model, model_dtype
    from lowbit.recipe import shorthand

    recipe = shorthand("gptq", scheme)
    out = out or f"out/{Path(model_arg).name}-gptq-{scheme}"
    base, tok = load_model(model_arg, dtype)
    ev = eval_windows("builtin", tok, windows, seq_len)
    click.echo(f"evaluating the base model on {windows}x{seq_len} tokens of the built-in "
               "evaluation text")
    t0 = time.perf_counter()
    rows = [{
        "method": "base", "scheme": DTYPE_NAMES[model_dtype(base)],
        "bpw": 8.0 * base.get_input_embeddings().weight.element_size(), **evaluate(base, ev),
        "size_mb": sum(p.numel() * p.element_size() for p in base.parameters()) / 1e6,
        "seconds": time.perf_counter() - t0,
    }]
    model, _, res, meta = quantize_job(model_arg, recipe, out,
                                       Calibration(samples=calib_samples, seq_len=seq_len),
                                       overwrite=True, dtype=dtype)
    q = evaluate(model, ev, base=base)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    rows.append({"method": "gptq", "scheme": scheme, "bpw": res.bits_per_weight(), **q,
                 "size_mb": size / 1e6, "seconds": meta["seconds"]})
    click.echo(format_table(rows, RESULT_COLS))
    click.echo(f"quantized model written to {out}")
    dump_json(json_path, {"rows": rows})
