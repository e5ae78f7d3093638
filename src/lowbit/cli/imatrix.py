"""``lowbit imatrix``: an importance matrix for llama.cpp's k-quants."""

from __future__ import annotations

import click

from lowbit.cli.common import calibration, calibration_options, dtype_option, dump_json, echo


@click.command("imatrix")
@click.argument("model", default="smollm2-135m")
@click.option("--out", required=True, type=click.Path(),
              help="output file: GGUF imatrix, or llama.cpp's legacy format if it ends in .dat")
@calibration_options()
@click.option("--chunk", default=8, show_default=True, help="windows per forward pass")
@click.option("--json", "json_path", type=click.Path(),
              help="write the results as JSON (- for standard output)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--overwrite", is_flag=True, help="replace an existing importance matrix file")
@dtype_option()
def command(model, out, calib, calib_samples, calib_offset, seq_len, chunk, json_path, quiet,
            overwrite, dtype):
    """Collect an importance matrix (per input column mean of x^2) for llama.cpp quantization."""
    from lowbit.cli.common import check_outputs
    from lowbit.jobs import imatrix_job

    check_outputs(json_path=json_path)
    cal = calibration(calib, calib_samples, calib_offset, seq_len)
    res = imatrix_job(model, out, cal, chunk, progress=not quiet, dtype=dtype,
                      overwrite=overwrite)
    echo(f"wrote {res['out']}: {res['entries']} entries ({res['format']}), "
         f"{cal.samples}x{cal.seq_len} tokens, {res['seconds']:.0f} s", json_path)
    dump_json(json_path, res)
