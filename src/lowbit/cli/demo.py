"""``lowbit demo``: GPTQ 4-bit on the built-in model, evaluated against the base."""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

from lowbit.cli.common import check_outputs, dtype_option, dump_json, format_table
from lowbit.errors import LowbitError

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
@click.option("--calib-samples", default=32, show_default=True,
              help="calibration windows (32 keeps the demo within minutes on 2 cores; "
                   "lowbit quantize defaults to 128)")
@click.option("--seq-len", default=512, show_default=True, help="tokens per window")
@click.option("--json", "json_path", type=click.Path())
@dtype_option()
def command(model_arg, scheme, out, windows, calib_samples, seq_len, json_path, dtype):
    """The main job: GPTQ 4-bit on the built-in model, next to round-to-nearest on the same
    scheme, both evaluated against the base (whose log-probabilities are computed once)."""
    import lowbit
    from lowbit.calib import eval_windows
    from lowbit.eval.base_cache import HeldLogprobs
    from lowbit.eval.metrics import evaluate
    from lowbit.io.native import check_writable
    from lowbit.jobs import Calibration, quantize_job
    from lowbit.models import DTYPE_NAMES, check_seq_len, load_model, model_dtype, parse_dtype
    from lowbit.recipe import shorthand

    # everything checked before the model loads
    check_outputs(json_path=json_path)
    if windows < 1:
        raise LowbitError(f"--windows must be at least 1, not {windows}")
    calib = Calibration(samples=calib_samples, seq_len=seq_len)
    rtn, gptq = shorthand("rtn", scheme), shorthand("gptq", scheme)
    parse_dtype(dtype)
    check_seq_len(model_arg, seq_len)
    out = out or f"out/{Path(model_arg).name}-gptq-{scheme}"
    check_writable(Path(out), overwrite=True)
    base, tok = load_model(model_arg, dtype)
    ev = eval_windows("builtin", tok, windows, seq_len)
    click.echo(f"evaluating on {windows}x{seq_len} tokens of the built-in evaluation text; "
               f"calibrating GPTQ on {calib_samples}x{seq_len} tokens sampled from the model")
    t0 = time.perf_counter()
    base_lp = HeldLogprobs(base, ev)  # computed once for every row
    nll = -sum(float(base_lp[i].gather(-1, ev[i : i + 1, 1:, None]).sum())
               for i in range(windows))
    rows = [{
        "method": "base", "scheme": DTYPE_NAMES[model_dtype(base)],
        "bpw": 8.0 * base.get_input_embeddings().weight.element_size(),
        "ppl": math.exp(nll / (windows * (seq_len - 1))),
        "size_mb": sum(p.numel() * p.element_size() for p in base.parameters()) / 1e6,
        "seconds": time.perf_counter() - t0,
    }]
    t0 = time.perf_counter()
    res = lowbit.quantize(base, rtn, None, progress=False)
    secs = time.perf_counter() - t0
    rows.append({"method": "rtn", "scheme": scheme, "bpw": res.bits_per_weight(),
                 **evaluate(base, ev, base=base_lp), "seconds": secs})
    del base, res
    model, _, res, meta = quantize_job(model_arg, gptq, out, calib, overwrite=True,
                                       dtype=dtype)
    q = evaluate(model, ev, base=base_lp)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    rows.append({"method": "gptq", "scheme": scheme, "bpw": res.bits_per_weight(), **q,
                 "size_mb": size / 1e6, "seconds": meta["seconds"]})
    click.echo(format_table(rows, RESULT_COLS))
    click.echo(f"quantized model written to {out}")
    dump_json(json_path, {"rows": rows})
