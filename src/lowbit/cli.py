"""The ``lowbit`` command line: argument parsing and display only; the work is in the API."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from lowbit.errors import LowbitError


def _dump_json(path: str | None, obj: dict) -> None:
    if path:
        try:
            Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")
        except OSError as e:
            raise LowbitError(f"cannot write {path}: {e.strerror}") from None


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


@click.group()
@click.version_option(package_name="lowbit")
def cli() -> None:
    """Post-training quantization of causal language models."""


def _common_quant(f):
    opts = [
        click.option("--method", default="gptq", show_default=True,
                     help="rtn, gptq, awq, awq+gptq, smoothquant, w8a8 or llm-int8"),
        click.option(
            "--scheme",
            default="w4g64",
            show_default=True,
            help="w4g64, w4g64-asym, w3g64, w2g32, w8, w4g64-mse ...; smoothquant/w8a8: "
                 "w8a8, w8a8-static, w7a8, w7a8-static, w8a8-fp8, w8a8-fp8-static",
        ),
        click.option(
            "--calib",
            default="builtin",
            show_default=True,
            help="calibration text: builtin, self, pydoc, or a .txt/.jsonl file",
        ),
        click.option("--calib-samples", default=128, show_default=True, help="windows"),
        click.option(
            "--calib-offset",
            default=0,
            show_default=True,
            help="first calibration window in the text",
        ),
        click.option("--seq-len", default=512, show_default=True, help="tokens per window"),
        click.option("--act-order/--no-act-order", default=None,
                     help="GPTQ, integer schemes: quantize columns by decreasing Hessian "
                          "diagonal [default: on]"),
        click.option("--static-groups/--no-static-groups", default=False, show_default=True),
        click.option(
            "--damp",
            default=0.01,
            show_default=True,
            help="GPTQ damping, fraction of the mean Hessian diagonal",
        ),
        click.option("--chunk", default=8, show_default=True, help="windows per forward pass"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def run_quantize(
    model_arg,
    method,
    scheme,
    calib,
    calib_samples,
    calib_offset,
    seq_len,
    act_order,
    static_groups,
    damp,
    chunk,
    out,
    overwrite,
    progress=True,
    fmt="native",
    tp=1,
    int8: dict | None = None,
):
    from lowbit.cli_int8 import INT8_CLI_METHODS, run_quantize_int8

    if method in INT8_CLI_METHODS:
        return run_quantize_int8(model_arg, method, scheme, calib, calib_samples, calib_offset,
                                 seq_len, chunk, out, overwrite, progress, fmt, **(int8 or {}))
    if (int8 or {}).get("alpha") is not None:
        raise LowbitError(f"--alpha is for smoothquant; {method} does not take it")
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.api import needs_calibration, preflight, quantize_model, resolve_scheme
    from lowbit.calib import calib_windows
    from lowbit.io.native import check_writable, save_quantized
    from lowbit.models import load_model

    sch = resolve_scheme(scheme)
    out = Path(out)
    check_writable(out, overwrite)
    t0 = time.perf_counter()
    model, tok = load_model(model_arg)
    spec = preflight(model, sch)
    from lowbit.cli_export import quantize_preflight

    g_idx = method in ("gptq", "awq+gptq") and act_order is not False and not static_groups
    g_idx = g_idx and getattr(sch, "granularity", "") == "group"
    notes = quantize_preflight(model, sch, fmt, tp, g_idx)
    for n in notes:
        click.echo(f"note: {n}", err=True)
    windows, record = None, None
    if needs_calibration(method, sch):
        windows, record = calib_windows(
            calib, model, tok, calib_samples, seq_len, calib_offset, progress=progress
        )
    rows_path = []

    res = quantize_model(
        model,
        method,
        sch,
        windows,
        GPTQConfig(damp=damp, act_order=act_order, static_groups=static_groups),
        chunk=chunk,
        progress=progress,
        on_row=rows_path.append,
    )
    meta = {
        "method": method,
        "scheme": sch.to_dict(),
        "base_model": str(model_arg),
        "calibration": record,
        "bits_per_weight": res.bits_per_weight(),
        "quantize_seconds": res.seconds,
        "recipe": {"damp": damp, "act_order": act_order, "static_groups": static_groups},
    }
    if fmt == "native":
        save_quantized(out, model, tok, res.qweights, meta, overwrite=overwrite, conv1d=spec.conv1d)
    else:
        from lowbit.io.hf_checkpoint import write_checkpoint

        write_checkpoint(out, fmt, model, tok, res.qweights, meta, overwrite=overwrite)
    with open(out / "layers.jsonl", "w") as f:
        for r in res.rows:
            f.write(json.dumps(r) + "\n")
    return model, tok, res, meta, time.perf_counter() - t0


@cli.command()
@click.argument("model", default="smollm2-135m")
@_common_quant
@click.option("--out", required=True, type=click.Path(), help="output folder")
@click.option("--format", "fmt", default="native", show_default=True,
              help="native (lowbit), compressed-tensors, gptq or awq")
@click.option("--tp", default=1, show_default=True,
              help="with --format: tensor-parallel degree the checkpoint must split into")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
@click.option("--alpha", type=float, default=None,
              help="smoothquant: migration strength [default: 0.5]")
@click.option("--threshold", default=6.0, show_default=True,
              help="llm-int8: |x| above which an input column stays in full precision")
@click.option("--int8-kernel", default="auto", show_default=True,
              help="int8 methods: auto, onednn, int_mm or emulate (see lowbit.runtime.int8)")
@click.option("--json", "json_path", type=click.Path(), help="write the results as JSON")
@click.option("--quiet", is_flag=True, help="no progress bars")
def quantize(
    model,
    method,
    scheme,
    calib,
    calib_samples,
    calib_offset,
    seq_len,
    act_order,
    static_groups,
    damp,
    chunk,
    out,
    fmt,
    tp,
    overwrite,
    alpha,
    threshold,
    int8_kernel,
    json_path,
    quiet,
):
    """Quantize MODEL (default: the built-in smollm2-135m) and save it to --out."""
    from lowbit.eval.metrics import peak_rss_bytes

    _, _, res, meta, secs = run_quantize(
        model,
        method,
        scheme,
        calib,
        calib_samples,
        calib_offset,
        seq_len,
        act_order,
        static_groups,
        damp,
        chunk,
        out,
        overwrite,
        progress=not quiet,
        fmt=fmt,
        tp=tp,
        int8={"alpha": alpha, "threshold": threshold, "kernel": int8_kernel},
    )
    losses = [r for r in res.rows if "loss" in r and "rtn_loss" in r]
    summary = meta | {
        "out": str(out),
        "seconds": secs,
        "peak_rss_bytes": peak_rss_bytes(),
        "storage_bytes": res.storage_bytes(),
        "layers": len(res.qweights),
    }
    if losses:
        summary["layers_below_rtn"] = sum(r["loss"] <= r["rtn_loss"] for r in losses)
    click.echo(
        f"wrote {out}: {res.method} {res.scheme.name}, {len(res.qweights)} layers, "
        f"{res.bits_per_weight():.3f} bits/weight, {secs:.0f} s"
    )
    if losses:
        click.echo(f"GPTQ layer loss below RTN's in {summary['layers_below_rtn']}/{len(losses)}")
    _dump_json(json_path, summary)


def run_eval(model_arg, data, windows, seq_len, base_arg, speed, progress=True) -> dict:
    from lowbit.calib import check_disjoint, eval_windows
    from lowbit.eval.metrics import (
        current_rss_bytes,
        evaluate,
        generation_speed,
        model_bytes,
        peak_rss_bytes,
    )
    from lowbit.io.native import read_description
    from lowbit.models import is_lowbit_dir, load_model, resolve

    path = resolve(model_arg)
    desc = read_description(path) if is_lowbit_dir(path) else {}
    check_disjoint(desc.get("calibration"), data, windows, seq_len)
    rss0 = current_rss_bytes()
    model, tok = load_model(model_arg, cache_weights=True)
    rss1 = current_rss_bytes()
    ev = eval_windows(data, tok, windows, seq_len)
    vocab = model.get_input_embeddings().num_embeddings
    if int(ev.max()) >= vocab:
        raise LowbitError(f"the tokenizer produces ids beyond the model's vocabulary ({vocab})")
    base = load_model(base_arg)[0] if base_arg else None
    res = evaluate(model, ev, base=base, progress=progress)
    res |= {
        "model": str(model_arg),
        "data": data,
        "model_bytes": model_bytes(model),
        "load_rss_bytes": rss1 - rss0,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if desc:
        res |= {
            "method": desc.get("method"),
            "scheme": desc["scheme"]["name"],
            "bpw": desc.get("bits_per_weight"),
        }
    if speed:
        res |= generation_speed(model, ev[0, :64])
    return res


@cli.command("eval")
@click.argument("model", default="smollm2-135m")
@click.option(
    "--data",
    default="builtin",
    show_default=True,
    help="evaluation text: builtin, pydoc, or a .txt/.jsonl file",
)
@click.option("--windows", default=64, show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--base", "base_arg", help="base model for KL divergence and top-1 agreement")
@click.option("--speed", is_flag=True, help="also measure batch-1 decoding speed")
@click.option("--json", "json_path", type=click.Path())
@click.option("--quiet", is_flag=True)
def eval_cmd(model, data, windows, seq_len, base_arg, speed, json_path, quiet):
    """Perplexity of MODEL (a model or a lowbit output folder), and KL/top-1 against --base."""
    res = run_eval(model, data, windows, seq_len, base_arg, speed, progress=not quiet)
    parts = [f"ppl {res['ppl']:.3f}"]
    if "kl_mean" in res:
        parts += [
            f"KL {res['kl_mean']:.4f}",
            f"KL p99 {res['kl_p99']:.4f}",
            f"top-1 {res['top1']:.3f}",
        ]
    if "decode_tok_s" in res:
        parts.append(f"{res['decode_tok_s']:.1f} tok/s")
    parts.append(f"model {res['model_bytes'] / 2**20:.1f} MiB")
    click.echo(f"{model}: " + ", ".join(parts) + f" ({res['windows']}x{res['seq_len']} tokens)")
    _dump_json(json_path, res)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "json_path", type=click.Path())
def info(path, json_path):
    """What a lowbit output folder holds."""
    from lowbit.io.native import read_description

    p = Path(path)
    if not p.is_dir():
        raise LowbitError(f"{path} is not a folder")
    desc = read_description(p)
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    click.echo(
        f"{path}: {desc.get('method')} {desc['scheme']['name']} from {desc.get('base_model')}"
    )
    click.echo(
        f"  layers: {len(desc['layers'])}, bits/weight {desc.get('bits_per_weight', 0):.3f}, "
        f"{size / 2**20:.1f} MiB on disk"
    )
    if desc.get("calibration"):
        c = desc["calibration"]
        click.echo(
            f"  calibration: {c['source']}, {c['windows']}x{c['seq_len']} from window {c['offset']}"
        )
    _dump_json(json_path, desc | {"bytes_on_disk": size})


# The 4-bit GPTQ scheme that measures best on the protocol (BENCHMARKS.md, issue 2 section)
DEMO_SCHEME = "w4g64-asym"


@cli.command()
@click.option("--scheme", default=DEMO_SCHEME, show_default=True)
@click.option("--out", type=click.Path(), help="[default: out/smollm2-135m-gptq-SCHEME]")
@click.option("--windows", default=32, show_default=True, help="evaluation windows")
@click.option("--calib-samples", default=128, show_default=True, help="calibration windows")
@click.option("--json", "json_path", type=click.Path())
def demo(scheme, out, windows, calib_samples, json_path):
    """The main job: GPTQ 4-bit on the built-in model, evaluated against the base."""
    from lowbit.calib import eval_windows
    from lowbit.eval.metrics import evaluate
    from lowbit.models import DEFAULT_MODEL, load_model

    out = out or f"out/{DEFAULT_MODEL}-gptq-{scheme}"
    base, tok = load_model(DEFAULT_MODEL)
    ev = eval_windows("builtin", tok, windows, 512)
    click.echo(f"evaluating the base model on {windows}x512 tokens of the built-in evaluation text")
    t0 = time.perf_counter()
    rows = [
        {
            "method": "base",
            "scheme": "fp32",
            "bpw": 32.0,
            **evaluate(base, ev),
            "size_mb": sum(p.numel() for p in base.parameters()) * 4 / 1e6,
            "seconds": time.perf_counter() - t0,
        }
    ]
    model, _, res, meta, secs = run_quantize(
        DEFAULT_MODEL, "gptq", scheme, "builtin", calib_samples, 0, 512, None, False, 0.01, 8, out,
        True,
    )
    q = evaluate(model, ev, base=base)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    rows.append(
        {
            "method": "gptq",
            "scheme": res.scheme.name,
            "bpw": res.bits_per_weight(),
            **q,
            "size_mb": size / 1e6,
            "seconds": secs,
        }
    )
    click.echo(format_table(rows, RESULT_COLS))
    click.echo(f"quantized model written to {out}")
    _dump_json(json_path, {"rows": rows})


def _register() -> None:
    from lowbit.cli_export import export, imatrix
    from lowbit.cli_int8 import inspect

    cli.add_command(export)
    cli.add_command(imatrix)
    cli.add_command(inspect)


_register()


def main() -> None:
    try:
        cli(standalone_mode=False)
    except LowbitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
