"""``lowbit compare``: several recipes, outputs and GGUF files side by side in one report."""

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
    note,
)


@click.command("compare")
@click.argument("model", default="smollm2-135m")
@click.option("--recipes", multiple=True, type=click.Path(),
              help="a recipe file to run (repeat the option for several)")
@click.option("--outputs", multiple=True, type=click.Path(),
              help="a finished lowbit output folder to include (repeatable)")
@click.option("--gguf", "ggufs", multiple=True, type=click.Path(),
              help="a GGUF file to include, evaluated through llama.cpp (repeatable)")
@click.option("--out", "report", required=True, type=click.Path(),
              help="report folder: report.md, report.html, report.json, plot.png, runs/")
@calibration_options()
@click.option("--data", default="builtin", show_default=True, help="evaluation text")
@click.option("--windows", default=64, show_default=True)
@click.option("--eval-seq-len", default=512, show_default=True,
              help="tokens per evaluation window")
@click.option("--speed", is_flag=True, help="also measure decode and prefill tokens/s")
@click.option("--json", "json_path", type=click.Path(),
              help="write the rows as JSON (- for standard output)")
@click.option("--quiet", is_flag=True)
@dtype_option()
def command(model, recipes, outputs, ggufs, report, calib, calib_samples, calib_offset, seq_len,
            data, windows, eval_seq_len, speed, json_path, quiet, dtype):
    """Run each recipe on MODEL, evaluate every result on the same windows against MODEL (one
    base pass), and write a report: the benchmark table (bits/weight, size, perplexity, KLD,
    same top token, speed, memory, quantize time) and perplexity against bits per weight."""
    from lowbit.compare import COLUMNS, compare_job, items, write_report

    check_outputs(json_path=json_path)
    things = items(list(recipes), list(outputs), list(ggufs))
    given = any(v is not None for v in (calib, calib_samples, calib_offset, seq_len))
    cal = calibration(calib, calib_samples, calib_offset, seq_len) if given else None
    rows = compare_job(model, things, Path(report), calibration=cal, data=data,
                       windows=windows, seq_len=eval_seq_len, speed=speed, dtype=dtype,
                       progress=not quiet, note=note)
    files = write_report(rows, Path(report), f"{model}: {windows} windows of {data}")
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    echo(format_table(rows, cols), json_path)
    echo("wrote " + ", ".join(str(f) for f in files), json_path)
    dump_json(json_path, rows)
