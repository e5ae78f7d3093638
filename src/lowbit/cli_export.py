"""Click commands `export` (GGUF for llama.cpp) and `imatrix` (importance matrix).

They are not registered here: `cli.py` adds them with `cli.add_command(export)` and
`cli.add_command(imatrix)`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from lowbit.errors import LowbitError

SERVING_FORMATS = ("compressed-tensors", "gptq", "awq")


def source_gguf_of(model_arg: str) -> Path | None:
    """The GGUF file a model argument comes from: the file itself, or a lowbit folder's base."""
    from lowbit.models import is_lowbit_dir, resolve

    path = resolve(model_arg)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if is_lowbit_dir(path):
        from lowbit.io.native import read_description

        base = read_description(path).get("base_model")
        if base:
            try:
                return source_gguf_of(base)
            except LowbitError:
                return None
    return None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LowbitError(f"{out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise LowbitError(f"{out} is a folder; give a file name ending in .gguf")
    if not out.parent.is_dir():
        raise LowbitError(f"folder {out.parent} does not exist")


def _dump(path: str | None, obj: dict) -> None:
    if path:
        try:
            Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")
        except OSError as e:
            raise LowbitError(f"cannot write {path}: {e.strerror}") from None


def run_export(
    model_arg, out, fmt, qtype, imatrix_path, overwrite, progress=True, tp=1, dtype="float16"
) -> dict:
    from lowbit.io.gguf_export import export_gguf, gguf_arch
    from lowbit.io.gguf_presets import get_preset
    from lowbit.io.imatrix import load_imatrix
    from lowbit.models import load_model

    if fmt in SERVING_FORMATS:
        return run_export_serving(model_arg, out, fmt, overwrite, tp, dtype)
    if fmt != "gguf":
        raise LowbitError(f"unknown export format {fmt!r}; known: gguf, "
                          f"{', '.join(SERVING_FORMATS)}")
    get_preset(qtype)  # unknown type names fail before any loading
    out = Path(out)
    _check_out(out, overwrite)
    im = load_imatrix(imatrix_path) if imatrix_path else None
    source = source_gguf_of(model_arg)
    model, tok = load_model(model_arg)
    gguf_arch(model)
    res = export_gguf(model, tok, out, qtype, imatrix=im, source_gguf=source, progress=progress)
    res |= {"model": str(model_arg), "imatrix_file": imatrix_path, "source_gguf": source}
    return res


def serving_preflight(qweights: dict, fmt: str, tp: int, heads=None) -> list[str]:
    """Format capacity, kernel shapes and TP splits for already-quantized weights; the notes."""
    from lowbit.io.targets import check_target

    if not qweights:
        raise LowbitError(
            f"--format {fmt} exports a quantized model: give a lowbit output folder (from "
            "`lowbit quantize`) or a compressed-tensors/GPTQ/AWQ checkpoint"
        )
    first = next(iter(qweights.values()))
    shapes = {n: tuple(q.shape) for n, q in qweights.items()}
    act = any(getattr(q, "g_idx", None) is not None for q in qweights.values())
    scheme = getattr(first, "scheme", None) or getattr(first, "grid", None)
    rep = check_target(shapes, scheme, fmt, tp, act_order=act, heads=heads)
    rep.raise_errors()
    return rep.notes


def quantize_preflight(model, scheme, fmt: str, tp: int, act_order: bool) -> list[str]:
    """`lowbit quantize --format X --tp N`: the target checks on the model's shapes, in seconds,
    before calibration. Returns the notes; raises on anything the target cannot take."""
    from lowbit.io.targets import check_target, model_shapes

    if fmt == "native":
        return []
    if fmt not in SERVING_FORMATS:
        raise LowbitError(f"unknown output format {fmt!r}; known: native, "
                          f"{', '.join(SERVING_FORMATS)} (gguf: use lowbit export)")
    shapes, heads = model_shapes(model)
    rep = check_target(shapes, scheme, fmt, tp, act_order=act_order, heads=heads)
    rep.raise_errors()
    return rep.notes


def run_export_serving(model_arg, out, fmt, overwrite, tp=1, dtype="float16") -> dict:
    """A lowbit folder (or an imported serving checkpoint) -> a compressed-tensors/GPTQ/AWQ
    checkpoint folder."""
    from lowbit.io.hf_checkpoint import quantized_weights, write_checkpoint
    from lowbit.io.native import check_writable, read_description
    from lowbit.io.targets import model_heads
    from lowbit.models import is_lowbit_dir, load_model, resolve

    out = Path(out)
    check_writable(out, overwrite)
    path = resolve(model_arg)
    meta = read_description(path) if is_lowbit_dir(path) else {"base_model": str(model_arg)}
    if meta.get("layers") and any(i.get("conv1d") for i in meta["layers"].values()):
        raise LowbitError(f"{fmt} export is for nn.Linear models, not GPT-2's Conv1D layers")
    model, tok = load_model(model_arg)
    qweights = quantized_weights(model)
    notes = serving_preflight(qweights, fmt, tp, model_heads(model))
    res = write_checkpoint(out, fmt, model, tok, qweights, meta, overwrite=overwrite, dtype=dtype)
    return res | {"model": str(model_arg), "notes": notes, "tp": tp}


@click.command("export")
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", default="gguf", show_default=True,
              help="gguf, compressed-tensors, gptq or awq")
@click.option(
    "--type",
    "qtype",
    default="Q4_K_M",
    show_default=True,
    help="GGUF type: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_K_S, Q4_0, Q3_K_M, Q2_K, F16 ...",
)
@click.option(
    "--imatrix",
    "imatrix_path",
    type=click.Path(),
    help="importance matrix file (GGUF or legacy .dat, from `lowbit imatrix` or llama-imatrix)",
)
@click.option("--tp", default=1, show_default=True,
              help="serving formats: check that this tensor-parallel degree splits every layer")
@click.option("--dtype", default="float16", show_default=True,
              help="serving formats: dtype of the unquantized tensors (float16, bfloat16, float32)")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@click.option("--json", "json_path", type=click.Path(), help="write the results as JSON")
@click.option("--quiet", is_flag=True, help="no progress bars")
def export(model, out, fmt, qtype, imatrix_path, tp, dtype, overwrite, json_path, quiet):
    """Write MODEL (a model, a .gguf, or a lowbit output folder) as OUT: a GGUF file for
    llama.cpp, or (--format compressed-tensors|gptq|awq, MODEL a lowbit output folder) a
    checkpoint folder for vLLM, SGLang and transformers."""
    t0 = time.perf_counter()
    res = run_export(model, out, fmt, qtype, imatrix_path, overwrite, progress=not quiet,
                     tp=tp, dtype=dtype)
    if fmt in SERVING_FORMATS:
        click.echo(f"wrote {out}: {fmt} {res['scheme']}, {res['layers']} quantized Linears, "
                   f"{res['tensor_bytes'] / 2**20:.1f} MiB of tensors in "
                   f"{len(res['shards'])} shard(s), {time.perf_counter() - t0:.0f} s")
        for n in res["notes"]:
            click.echo(f"note: {n}")
        _dump(json_path, res)
        return
    mix = ", ".join(f"{r['tensors']} {t}" for t, r in sorted(res["types"].items()))
    click.echo(
        f"wrote {out}: {res['qtype']}{' with imatrix' if res['imatrix'] else ''}, "
        f"{res['file_bytes'] / 2**20:.1f} MiB, {res['bpw']:.3f} bits/weight "
        f"({res['bpw_linear']:.3f} over the blocks' Linears), tensors: {mix}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    if res["imatrix_missing"]:
        click.echo(f"note: the imatrix has no entry for {len(res['imatrix_missing'])} tensors")
    _dump(json_path, res)


def run_imatrix(
    model_arg, out, calib, calib_samples, calib_offset, seq_len, chunk, progress=True
) -> dict:
    from lowbit.calib import calib_windows
    from lowbit.io.imatrix import collect_imatrix, save_imatrix
    from lowbit.models import load_model

    out = Path(out)
    if not out.parent.is_dir():
        raise LowbitError(f"folder {out.parent} does not exist")
    t0 = time.perf_counter()
    model, tok = load_model(model_arg)
    windows, record = calib_windows(
        calib, model, tok, calib_samples, seq_len, calib_offset, progress=progress
    )
    im = collect_imatrix(
        model, windows, chunk=chunk, progress=progress, dataset=str(record["source"])
    )
    save_imatrix(im, out)
    return {
        "out": str(out),
        "format": "dat" if out.suffix == ".dat" else "gguf",
        "entries": len(im.data),
        "calibration": record,
        "seconds": time.perf_counter() - t0,
    }


@click.command("imatrix")
@click.argument("model", default="smollm2-135m")
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="output file: GGUF imatrix, or llama.cpp's legacy format if it ends in .dat",
)
@click.option(
    "--calib",
    default="builtin",
    show_default=True,
    help="calibration text: builtin, self, pydoc, or a .txt/.jsonl file",
)
@click.option("--calib-samples", default=128, show_default=True, help="windows")
@click.option(
    "--calib-offset", default=0, show_default=True, help="first calibration window in the text"
)
@click.option("--seq-len", default=512, show_default=True, help="tokens per window")
@click.option("--chunk", default=8, show_default=True, help="windows per forward pass")
@click.option("--json", "json_path", type=click.Path(), help="write the results as JSON")
@click.option("--quiet", is_flag=True, help="no progress bars")
def imatrix(model, out, calib, calib_samples, calib_offset, seq_len, chunk, json_path, quiet):
    """Collect an importance matrix (per input column mean of x^2) for llama.cpp quantization."""
    res = run_imatrix(
        model, out, calib, calib_samples, calib_offset, seq_len, chunk, progress=not quiet
    )
    click.echo(
        f"wrote {res['out']}: {res['entries']} entries ({res['format']}), "
        f"{calib_samples}x{seq_len} tokens, {res['seconds']:.0f} s"
    )
    _dump(json_path, res)
