"""``lowbit analyze``: how much each Linear costs the model at each candidate scheme."""

from __future__ import annotations

from pathlib import Path

import click

from lowbit.cli.common import (
    calibration,
    calibration_options,
    check_outputs,
    dtype_option,
    dump_json,
    echo,
    format_table,
)
from lowbit.errors import LowbitError

DEFAULT_SCHEMES = "w2g64,w3g64,w4g64,w8"


@click.command("analyze")
@click.argument("model", default="smollm2-135m")
@click.option("--schemes", default=DEFAULT_SCHEMES, show_default=True,
              help="candidate schemes, comma-separated: lowbit schemes (for quantize "
                   "--target-bpw) or llama.cpp types such as Q4_K, Q6_K, Q8_0 (for export "
                   "--target-bpw)")
@calibration_options(samples=4, seq_len=128)
@click.option("--method", default="rtn", show_default=True,
              help="the rounder each candidate is rounded with: rtn, or gptq / hqq as "
                   "lowbit quantize --method rounds it (their input statistics from "
                   "--hessian-samples windows of 512 tokens of the same text)")
@click.option("--hessian-samples", type=int, default=128, show_default=True,
              help="with --method gptq/hqq: windows of 512 tokens (or the model's context) for the "
                   "rounder's input statistics")
@click.option("--top", default=10, show_default=True,
              help="print the N most sensitive layers at the lowest scheme")
@click.option("--plot", type=click.Path(),
              help="save a PNG heat map of the KL per block and Linear, one panel per scheme")
@click.option("--json", "json_path", type=click.Path(),
              help="write the measurements as JSON (- for standard output); "
                   "lowbit quantize --sensitivity reads it")
@click.option("--quiet", is_flag=True)
@dtype_option()
def command(model, schemes, calib, calib_samples, calib_offset, seq_len, method, hessian_samples,
            top, plot, json_path, quiet, dtype):
    """Measure each block Linear of MODEL: the KL divergence of the model's next-token
    distributions from the unquantized model's when only that Linear is rounded (RTN, or
    --method) to each scheme, its stored bytes, and a Hessian proxy with its rank correlation
    to the KL."""
    from lowbit.jobs import Calibration, analyze_job
    from lowbit.models import max_positions

    check_outputs(json_path=json_path, plot=plot)
    names = [s.strip() for s in schemes.split(",") if s.strip()]
    if top < 0:
        raise LowbitError(f"--top must not be negative, not {top}")
    cal = calibration(calib, calib_samples, calib_offset, seq_len, default_samples=4,
                      default_seq_len=128)
    hes = None
    if method != "rtn":  # windows of 512 tokens, or of the model's context when shorter
        found = max_positions(model)
        hes = Calibration(cal.source, hessian_samples, min(512, found[0] if found else 512),
                          cal.offset)
    sens = analyze_job(model, names, cal, progress=not quiet, dtype=dtype, method=method,
                       hessian=hes)
    low = names[0]
    rows = sorted(({"layer": n, **{s: r["schemes"].get(s, {}).get("kl") for s in names}}
                   for n, r in sens["layers"].items()), key=lambda r: -(r[low] or 0))
    cols = [("layer", "layer", "")] + [(s, f"KL {s}", ".2e") for s in names]
    echo(format_table(rows[:top], cols), json_path)
    rho = ", ".join(f"{k} {v:.2f}" for k, v in sens["spearman"].items())
    echo(f"{len(rows)} layers x {len(names)} schemes ({method}) on {sens['tokens']} tokens "
         f"in {sens['seconds']:.0f} s; Spearman rank correlation of the Hessian proxy with the KL: "
         f"{rho}", json_path)
    if plot:
        plot_sensitivity(sens, names, Path(plot))
        echo(f"wrote {plot}", json_path)
    dump_json(json_path, sens)


def plot_sensitivity(sens: dict, schemes: list[str], path: Path) -> None:
    """One heat map per scheme: blocks down, Linear kinds across, log-scaled KL."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        raise LowbitError("--plot needs matplotlib (pip install matplotlib)") from None
    import numpy as np

    layers = sens["layers"].values()
    kinds = list(dict.fromkeys(r["kind"] for r in layers))
    blocks = 1 + max(r["block"] for r in layers)
    fig, axes = plt.subplots(1, len(schemes), figsize=(2.2 * len(schemes) + 1.5,
                                                       0.18 * blocks + 2.5), squeeze=False)
    kls = [c["kl"] for r in layers for c in r["schemes"].values() if c["kl"] > 0]
    norm = LogNorm(vmin=min(kls), vmax=max(kls)) if kls else None
    for ax, s in zip(axes[0], schemes, strict=True):
        grid = np.full((blocks, len(kinds)), np.nan)
        for r in layers:
            if s in r["schemes"]:
                grid[r["block"], kinds.index(r["kind"])] = max(r["schemes"][s]["kl"], 1e-12)
        im = ax.imshow(grid, aspect="auto", norm=norm, cmap="viridis")
        ax.set_title(s)
        ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], rotation=90)
        ax.set_ylabel("block")
    fig.colorbar(im, ax=axes[0].tolist(), label="KL divergence from the unquantized model")
    from lowbit.io.atomic import atomic_output

    with atomic_output(path, folder=False) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
