"""Issue 4's table: every number format with RTN and GPTQ rounding, on the protocol.

    python benchmarks/formats.py --calib wiki --calib-windows 128 --eval-windows 64 \
        --json formats.json --plot formats.png
    python benchmarks/formats.py --formats w4g64,nf4,mxfp4 --methods gptq
    python benchmarks/formats.py gptq:nf4 gptq:w4g64:act_order=1     # explicit variants
    python benchmarks/formats.py --methods gptq --merge rtn.json --plot all.png  # add old rows
    python benchmarks/formats.py --report rtn.json gptq.jsonl --plot all.png  # no measuring

Columns: bits per weight (the grid's accounting over the quantized Linears), perplexity, mean
KL and top-1 agreement against the base model, elements clipped beyond the grid, GPTQ layers
whose Hessian loss is below RTN's, quantization seconds. The base model's logits are shared by
every variant (one pass, kept in memory); one quantized copy of the model is held at a time.
SqueezeLLM (sq3, sq4) is calibrated with RTN too: its k-means is weighted by diag(H).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from quality import WIKI, base_logprobs, calibration, evaluate_against
from variants import parse_variant

import lowbit
from lowbit import data
from lowbit.cli.common import format_table
from lowbit.eval.metrics import peak_rss_bytes
from lowbit.models import load_model

FORMATS = (
    "w4g64", "w4g64-asym", "nf4", "nf4-dq", "fp4-g32", "mxfp4", "nvfp4", "mxfp6-e3m2",
    "mxfp6-e2m3", "mxfp8-e4m3", "fp8-e4m3", "mxint8", "sq4", "sq3", "ternary", "w3g64",
)
COLS = [("format", "format", ""), ("method", "method", ""), ("bpw", "bits/w", ".3f"),
        ("ppl", "ppl", ".3f"), ("kl_mean", "KL", ".4f"), ("top1", "top-1", ".3f"),
        ("saturated", "clipped", "d"), ("below_rtn", "<RTN", ""), ("seconds", "quant s", ".0f")]


def quantize_variant(variant: str, model_name: str, cal: torch.Tensor | None) -> tuple:
    """(quantized model, its table row without the quality figures)."""
    method, scheme = variant.split(":")[:2]
    recipe = parse_variant(variant)
    model, _ = load_model(model_name)
    use_cal = cal if lowbit.plan(model, recipe).needs_data else None
    t0 = time.perf_counter()
    res = lowbit.quantize(model, recipe, use_cal, progress=False)
    secs = time.perf_counter() - t0
    losses = [r for r in res.rows if "rtn_loss" in r]
    row = {
        "variant": variant,
        "format": scheme,
        "method": method,
        "bpw": res.bits_per_weight(),
        "storage_bytes": res.storage_bytes(),
        "saturated": sum(r["saturated"] for r in res.rows),
        "below_rtn": f"{sum(r['loss'] <= r['rtn_loss'] for r in losses)}/{len(losses)}"
        if losses else None,
        "calibrated": use_cal is not None,
        "seconds": secs,
    }
    print(f"quantized {variant} in {secs:.0f} s", flush=True)
    return model, row


def plot(rows: list[dict], base_ppl: float, path: str, title: str) -> None:
    """Two panels. Left: perplexity (log) against bits per weight, RTN and GPTQ as two marker
    styles, points beyond 12x the base drawn on the top edge with their value. Right: one line
    per format (sorted by bits), RTN -> GPTQ, so crowded 4-bit formats stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [1.1, 1]})
    styles = {"rtn": ("o", "tab:blue"), "gptq": ("^", "tab:red")}
    top = 12 * base_ppl
    for method in sorted({r["method"] for r in rows}):
        pts = [r for r in rows if r["method"] == method]
        marker, color = styles.get(method, ("s", "tab:gray"))
        ax.scatter([r["bpw"] for r in pts], [min(r["ppl"], top) for r in pts], marker=marker,
                   color=color, label=method.upper(), s=36, zorder=3)
        for r in pts:
            if r["ppl"] > top:
                ax.annotate(f"{r['format']} {r['ppl']:.1e} (off scale)", (r["bpw"], top),
                            textcoords="offset points", xytext=(6, -4 if method == "rtn" else -14),
                            fontsize=7, color=color)
    ax.axhline(base_ppl, color="black", linestyle="--", linewidth=0.8,
               label=f"fp32 base ({base_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_ylim(base_ppl * 0.95, top * 1.15)
    ax.set_xlabel("bits per weight (quantized Linears)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")

    by_format: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_format.setdefault(r["format"], {})[r["method"]] = r
    order = sorted(by_format, key=lambda f: (-min(r["bpw"] for r in by_format[f].values()), f))
    for y, fmt in enumerate(order):
        got = by_format[fmt]
        xs = [min(got[m]["ppl"], top) for m in ("rtn", "gptq") if m in got]
        bx.plot(xs, [y] * len(xs), color="lightgray", linewidth=2, zorder=1)
        for m, r in got.items():
            marker, color = styles.get(m, ("s", "tab:gray"))
            bx.scatter([min(r["ppl"], top)], [y], marker=marker, color=color, s=36, zorder=3)
    labels = [f"{f} ({min(r['bpw'] for r in by_format[f].values()):.2f} b)" for f in order]
    bx.set_yticks(range(len(order)), labels, fontsize=8)
    bx.axvline(base_ppl, color="black", linestyle="--", linewidth=0.8)
    bx.set_xscale("log")
    bx.set_xlim(base_ppl * 0.97, top * 1.1)
    bx.set_xlabel("perplexity (log scale; capped at 12x base)")
    bx.set_title("per format: RTN (circle) and GPTQ (triangle)", fontsize=10)
    bx.grid(True, which="both", axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_rows(paths: list[str]) -> tuple[list[dict], dict | None, set[int]]:
    """Rows of earlier runs: --json documents or --jsonl files. (rows, base row, eval sizes)."""
    rows, base, sizes = [], None, set()
    for path in paths:
        with open(path) as f:
            if path.endswith(".jsonl"):
                got = [json.loads(line) for line in f if line.strip()]
                sizes |= {r["eval_windows"] for r in got}
            else:
                doc = json.load(f)
                got = doc["rows"]
                sizes.add(doc["settings"]["eval_windows"])
        for r in got:
            if r["method"] == "base":
                base = r
            else:
                rows.append(r)
    return rows, base, sizes


def markdown(rows: list[dict], base: dict) -> str:
    """One line per format: RTN and GPTQ side by side; GPTQ in bold where it beats RTN."""
    def ppl(r: dict | None) -> str:
        return "–" if r is None else (f"{r['ppl']:.4g}" if r["ppl"] > 1e4 else f"{r['ppl']:.3f}")

    def val(r: dict | None, key: str, fmt: str) -> str:
        return "–" if r is None or r.get(key) is None else format(r[key], fmt)

    by = {(r["format"], r["method"]): r for r in rows}
    out = ["| format | bits/w (RTN / GPTQ) | RTN ppl | RTN KL | RTN top-1 | clipped (RTN) "
           "| GPTQ ppl | GPTQ KL | GPTQ top-1 |", "|---|---|---|---|---|---|---|---|---|",
           f"| fp32 base | 32 | {base['ppl']:.3f} | – | – | – | – | – | – |"]
    extra = sorted({k[0] for k in by} - set(FORMATS))
    for fmt in [f for f in FORMATS if any(k[0] == f for k in by)] + extra:
        r, g = by.get((fmt, "rtn")), by.get((fmt, "gptq"))
        gp = ppl(g)
        if g is not None and r is not None and g["ppl"] < r["ppl"]:
            gp = f"**{gp}**"
        bits = " / ".join(dict.fromkeys(val(x, "bpw", ".3f") for x in (r, g) if x))
        out.append(f"| {fmt} | {bits} | {ppl(r)} | {val(r, 'kl_mean', '.4f')} | "
                   f"{val(r, 'top1', '.3f')} | {val(r, 'saturated', 'd')} | {gp} | "
                   f"{val(g, 'kl_mean', '.4f')} | {val(g, 'top1', '.3f')} |")
    return "\n".join(out)


def report(paths: list[str], plot_path: str | None) -> None:
    """Table (markdown) and plot from saved rows, without loading a model."""
    rows, base, sizes = load_rows(paths)
    if base is None:
        raise SystemExit("--report needs a base row (a --json document, or a --jsonl file "
                         "written since base rows are logged)")
    if len(sizes) != 1:
        raise SystemExit(f"rows were evaluated on different window counts: {sorted(sizes)}")
    print(markdown(rows, base))
    if plot_path:
        calib = sorted({r.get("calib_windows") for r in rows if r.get("calib_windows")})
        title = (f"WikiText-2 perplexity, {sizes.pop()}x512 tokens"
                 + (f"; calibration wiki x{calib[0]}" if len(calib) == 1 else ""))
        plot(rows, base["ppl"], plot_path, title)
        print(f"wrote {plot_path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="*", help="method:scheme[:key=value,...]; overrides "
                    "--formats and --methods")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated schemes")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wiki", help="wiki, pydoc, self, builtin or a file")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--jsonl", help="append each row to this file as soon as it is measured")
    ap.add_argument("--json", help="write the table and settings as one JSON document")
    ap.add_argument("--plot", help="write perplexity against bits per weight to this PNG")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="add the rows of earlier --json documents (same evaluation windows) "
                    "to the table and the plot")
    ap.add_argument("--report", nargs="+", metavar="FILE",
                    help="measure nothing: print a markdown table (and --plot) from these "
                    "--json documents and --jsonl files")
    a = ap.parse_args()
    if a.report:
        report(a.report, a.plot)
        return

    variants = a.variants or [f"{m}:{f}" for f in a.formats.split(",")
                              for m in a.methods.split(",")]
    base, tok = load_model(a.model)
    ids = data.tokenize(tok, data.read_text(WIKI))
    ev = data.windows(ids, a.eval_windows, 512)
    cal = None
    if any(lowbit.plan(base, parse_variant(v)).needs_data for v in variants):
        cal = calibration(a.calib, base, tok, ids, a.calib_windows)
    blp = base_logprobs(base, ev)  # the base pass is shared by every variant
    base_res = evaluate_against(base, ev, None)
    if a.jsonl:  # the base row too, so --report can rebuild the table from this file alone
        with open(a.jsonl, "a") as f:
            f.write(json.dumps({"format": "fp32", "method": "base", "bpw": 32.0, **base_res,
                                "eval_windows": a.eval_windows}) + "\n")
    rows = []
    for v in variants:
        model, row = quantize_variant(v, a.model, cal)
        row.update(evaluate_against(model, ev, blp))
        rows.append(row)
        print(format_table([row], COLS).splitlines()[-1], flush=True)
        if a.jsonl:
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(row | {"eval_windows": a.eval_windows,
                                          "calib_windows": a.calib_windows}) + "\n")
        del model
        gc.collect()
    for path in a.merge:
        with open(path) as f:
            doc = json.load(f)
        if doc["settings"]["eval_windows"] != a.eval_windows:
            raise SystemExit(f"{path}: evaluated on {doc['settings']['eval_windows']} windows, "
                             f"not {a.eval_windows}")
        rows.extend(r for r in doc["rows"] if r["method"] != "base")
    order = {f: i for i, f in enumerate(FORMATS)}
    rows.sort(key=lambda r: (order.get(r["format"], len(order)), r["method"] != "rtn"))
    table = [{"format": "fp32", "method": "base", "bpw": 32.0, **base_res}, *rows]
    print(format_table(table, COLS))
    settings = {"model": a.model, "eval_windows": a.eval_windows, "calib": a.calib,
                "calib_windows": a.calib_windows, "peak_rss_bytes": peak_rss_bytes()}
    print(f"eval windows {a.eval_windows}, calibration {a.calib} x{a.calib_windows}, "
          f"peak RSS {settings['peak_rss_bytes'] / 2**30:.2f} GiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": settings, "rows": table}, f, indent=1)
    if a.plot:
        title = (f"{a.model}: WikiText-2 perplexity, {a.eval_windows}x512 tokens; "
                 f"calibration {a.calib} x{a.calib_windows}")
        plot(rows, base_res["ppl"], a.plot, title)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
