"""``lowbit inspect``: the outlier profile of a model's activations, and a channel plot."""

from __future__ import annotations

from pathlib import Path

import click

from lowbit.cli.common import calibration, calibration_options, dtype_option, dump_json, echo
from lowbit.errors import LowbitError


@click.command("inspect")
@click.argument("model", default="smollm2-135m")
@calibration_options(samples=32)
@click.option("--stats", "stats_path", type=click.Path(),
              help="reuse saved activation statistics (act_stats.safetensors) instead")
@click.option("--ratio", default=20.0, show_default=True,
              help="an outlier channel's absmax is this many times the median channel's")
@click.option("--plot", type=click.Path(), help="save a PNG of per-channel magnitudes")
@click.option("--layer", default="model.layers.0.self_attn.q_proj", show_default=True,
              help="the Linear whose input --plot shows")
@click.option("--save-stats", type=click.Path(), help="write the statistics (safetensors)")
@click.option("--json", "json_path", type=click.Path(),
              help="write the profile as JSON (- for standard output)")
@click.option("--quiet", is_flag=True)
@dtype_option()
def command(model, calib, calib_samples, calib_offset, seq_len, stats_path, ratio, plot, layer,
            save_stats, json_path, quiet, dtype):
    """Outlier channels of MODEL's activations, per block: how many, how far above the median
    channel, which Linears they feed."""
    from lowbit.cli.common import check_outputs
    from lowbit.io.atomic import atomic_output
    from lowbit.jobs import inspect_job
    from lowbit.pipeline.stats import save_stats as write_stats

    check_outputs(json_path=json_path, plot=plot, save_stats=save_stats)
    if ratio <= 1:
        raise LowbitError(f"--ratio must be above 1 (an outlier's absmax over the median "
                          f"channel's), not {ratio}")
    cal = calibration(calib, calib_samples, calib_offset, seq_len, default_samples=32)
    rows, stats, _ = inspect_job(model, cal, stats_path, ratio, progress=not quiet,
                                 dtype=dtype)
    if save_stats:
        with atomic_output(Path(save_stats), folder=False) as tmp:
            write_stats(tmp, stats)
    for r in rows:
        echo(f"block {r['block']:>3}  {'+'.join(n.rsplit('.', 1)[-1] for n in r['feeds']):<24} "
             f"outlier channels {r['channels']:>3}  max/median {r['max_ratio']:8.1f}  "
             f"top {r['top'][:5]}", json_path)
    if plot:
        if layer not in stats:
            raise LowbitError(f"no statistics for {layer!r}; e.g. {next(iter(stats))}")
        plot_channels(stats[layer], layer, Path(plot))
        echo(f"wrote {plot}", json_path)
    dump_json(json_path, rows)


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
    from lowbit.io.atomic import atomic_output

    with atomic_output(path, folder=False) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
