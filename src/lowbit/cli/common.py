"""What the commands share: JSON output, tables, notes, the calibration options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def check_outputs(**paths: str | None) -> None:
    """Output files the options name (``json_path="r.json"``: ``--json``), checked before any
    long run: each folder must exist and be writable, and no path may be a folder."""
    from lowbit.io.atomic import check_output_file

    for option, path in paths.items():
        if path and path != "-":
            check_output_file(path, "--" + option.removesuffix("_path").replace("_", "-"))


def dump_json(path: str | None, obj) -> None:
    """Write ``obj`` as JSON to ``path`` (``-``: standard output), whole or not at all."""
    from lowbit.io.atomic import atomic_output

    if not path:
        return
    text = json.dumps(obj, indent=1, default=str) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    with atomic_output(Path(path), folder=False) as tmp:
        tmp.write_text(text)


def note(msg: str) -> None:
    click.echo(f"note: {msg}", err=True)


def echo(msg: str, json_path: str | None = None) -> None:
    """Human output; on stderr when ``--json -`` takes stdout."""
    click.echo(msg, err=json_path == "-")


def format_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format spec). Missing values print as '-'."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [
        "  ".join(c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(cols)))
        for c in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]


def dtype_option(help_text: str = "dtype to load the model in: auto = the checkpoint's own "
                 "(config.json; GGUF files and quantized folders load in fp32)"):
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto",
                        show_default=True, help=help_text)


# lowbit.runtime.kernels.KERNELS (not imported here: the CLI starts without torch)
KERNEL_CHOICES = ("auto", "auto-a8", "lut4", "u8", "int4-a8", "int8-a8", "int4pack", "int8pack",
                  "dequant")


def kernel_option():
    return click.option(
        "--kernel", default="auto", show_default=True, type=click.Choice(KERNEL_CHOICES),
        help="matrix product of quantized Linears: auto = the fastest each layer allows "
             "(lowbit info lists them); lut4/u8 = lowbit's CPU kernels; int4-a8/int8-a8 = "
             "the same for integer grids with activations rounded to int8 per 32 (faster, "
             "not exact; auto-a8: those wherever they apply, auto elsewhere); "
             "int4pack/int8pack = torch's (fast only for bf16); dequant = decode the weight, "
             "then a dense product")


def compile_option():
    return click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
                        help="compile the one-token step with torch.compile: faster decoding "
                             "after about 40 s of compiling")


def calibration_options(samples: int = 128, seq_len: int = 512):
    """--calib, --calib-samples, --calib-offset, --seq-len (defaults None: the command decides
    whether a recipe's own calibration applies)."""
    opts = [
        click.option("--calib", default=None,
                     help="calibration text: builtin, self, pydoc, or a .txt/.jsonl file "
                          "[default: builtin]"),
        click.option("--calib-samples", type=int, default=None,
                     help=f"calibration windows [default: {samples}]"),
        click.option("--calib-offset", type=int, default=None,
                     help="first calibration window in the text [default: 0]"),
        click.option("--seq-len", type=int, default=None,
                     help=f"tokens per window [default: {seq_len}]"),
    ]

    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def calibration(calib, samples, offset, seq_len, base: dict | None = None, default_samples=128,
                default_seq_len=512):
    """A Calibration from the options given, else the recipe's (``base``), else defaults."""
    from lowbit.jobs import Calibration

    base = base or {}
    given = {"source": calib, "samples": samples, "offset": offset, "seq_len": seq_len}
    kw = {k: v if v is not None else base.get(k) for k, v in given.items()}
    kw = {k: v for k, v in kw.items() if v is not None}
    kw.setdefault("samples", default_samples)
    kw.setdefault("seq_len", default_seq_len)
    return Calibration(**kw)
