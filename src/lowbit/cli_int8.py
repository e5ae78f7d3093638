"""Command-line glue for the activation-aware methods: ``lowbit quantize --method smoothquant /
w8a8 / llm-int8`` (int8 runtime modules, saved in the native format) and ``lowbit inspect``
(the outlier profile of a model's activations)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from lowbit.errors import LowbitError

INT8_CLI_METHODS = ("smoothquant", "w8a8", "llm-int8")


def run_quantize_int8(model_arg, method, scheme, calib, calib_samples, calib_offset, seq_len,
                      chunk, out, overwrite, progress, fmt, alpha, threshold, kernel):
    """Like ``cli.run_quantize`` for the int8 methods; saves the activation statistics it
    collected next to the output (``act_stats.safetensors``)."""
    from lowbit.arch import spec_for
    from lowbit.calib import calib_windows
    from lowbit.io.native import check_writable, save_quantized
    from lowbit.methods.int8_methods import parse_int8_scheme, quantize_int8
    from lowbit.models import load_model
    from lowbit.pipeline.act_stats import save_act_stats

    if fmt != "native":
        raise LowbitError(f"--method {method} saves in the native format only, not {fmt}")
    sch = parse_int8_scheme(method, scheme)
    out = Path(out)
    check_writable(out, overwrite)
    t0 = time.perf_counter()
    model, tok = load_model(model_arg)
    spec = spec_for(model)
    windows, record = None, None
    if method == "smoothquant" or sch.act == "static":
        windows, record = calib_windows(
            calib, model, tok, calib_samples, seq_len, calib_offset, progress=progress
        )
    res = quantize_int8(model, method, sch.name, windows, 0.5 if alpha is None else alpha,
                        threshold, kernel, chunk, progress)
    meta = {
        "method": method,
        "scheme": sch.to_dict(),
        "base_model": str(model_arg),
        "calibration": record,
        "bits_per_weight": res.bits_per_weight(),
        "quantize_seconds": res.seconds,
        "recipe": {"alpha": alpha if method == "smoothquant" else None,
                   "threshold": threshold if method == "llm-int8" else None, "kernel": kernel},
    }
    save_quantized(out, model, tok, res.qweights, meta, overwrite=overwrite, conv1d=spec.conv1d)
    if res.stats is not None:
        save_act_stats(out / "act_stats.safetensors", res.stats)
    with open(out / "layers.jsonl", "w") as f:
        for r in res.rows:
            f.write(json.dumps(r) + "\n")
    return model, tok, res, meta, time.perf_counter() - t0


@click.command()
@click.argument("model", default="smollm2-135m")
@click.option("--calib", default="builtin", show_default=True,
              help="calibration text: builtin, self, pydoc, or a .txt/.jsonl file")
@click.option("--calib-samples", default=32, show_default=True, help="windows")
@click.option("--calib-offset", default=0, show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--stats", "stats_path", type=click.Path(),
              help="reuse saved activation statistics (act_stats.safetensors) instead")
@click.option("--ratio", default=20.0, show_default=True,
              help="an outlier channel's absmax is this many times the median channel's")
@click.option("--plot", type=click.Path(), help="save a PNG of per-channel magnitudes")
@click.option("--layer", default="model.layers.0.self_attn.q_proj", show_default=True,
              help="the Linear whose input --plot shows")
@click.option("--save-stats", type=click.Path(), help="write the statistics (safetensors)")
@click.option("--json", "json_path", type=click.Path())
@click.option("--quiet", is_flag=True)
def inspect(model, calib, calib_samples, calib_offset, seq_len, stats_path, ratio, plot, layer,
            save_stats, json_path, quiet):
    """Outlier channels of MODEL's activations, per block: how many, how far above the median
    channel, which Linears they feed."""
    from lowbit.arch import spec_for
    from lowbit.calib import calib_windows
    from lowbit.models import load_model
    from lowbit.pipeline.act_stats import (
        collect_act_stats,
        load_act_stats,
        outlier_profile,
        save_act_stats,
    )

    m, tok = load_model(model)
    spec = spec_for(m)
    if stats_path:
        stats = load_act_stats(Path(stats_path))
    else:
        windows, _ = calib_windows(calib, m, tok, calib_samples, seq_len, calib_offset,
                                   progress=not quiet)
        stats = collect_act_stats(m, spec, windows, progress=not quiet)
    if save_stats:
        save_act_stats(Path(save_stats), stats)
    rows = outlier_profile(stats, spec, ratio)
    for r in sorted(rows, key=lambda r: (r["block"], spec.linears.index(r["feeds"][0]))):
        click.echo(
            f"block {r['block']:>3}  {'+'.join(n.rsplit('.', 1)[-1] for n in r['feeds']):<24} "
            f"outlier channels {r['channels']:>3}  max/median {r['max_ratio']:8.1f}  "
            f"top {r['top'][:5]}"
        )
    if plot:
        if layer not in stats:
            raise LowbitError(f"no statistics for {layer!r}; e.g. {next(iter(stats))}")
        plot_channels(stats[layer], layer, Path(plot))
        click.echo(f"wrote {plot}")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")


def plot_channels(st, layer: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LowbitError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ch = range(st.absmax.shape[0])
    ax.bar(ch, st.absmax.numpy(), width=1.0, label="max |x|", color="tab:red")
    ax.bar(ch, st.mean_abs.numpy(), width=1.0, label="mean |x|", color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("input channel")
    ax.set_title(f"{layer}: per-channel input magnitude ({st.n} tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
