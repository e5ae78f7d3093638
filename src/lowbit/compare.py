"""Several recipes (and finished outputs, and GGUF files) side by side: one report.

``compare_job`` quantizes ``MODEL`` with each recipe into ``REPORT/runs/<name>`` (a finished
run is not redone), evaluates every output on the same windows against the model before
quantizing (its log-probabilities computed once: ``lowbit.eval.base_cache``), GGUF files
through llama.cpp, and writes ``report.json``, ``report.md``, ``report.html`` and
``plot.png`` (perplexity against bits per weight, with the Pareto frontier). Each finished row
is appended to ``rows.jsonl`` at once, so an interrupted comparison keeps its rows and the
next run of the same command goes on from there.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.jobs import Calibration, eval_job, quantize_job
from lowbit.recipe import Recipe, load_recipe

COLUMNS = [("name", "name", ""), ("method", "method", ""), ("bpw", "bits/weight", ".3f"),
           ("size_mb", "size MB", ".1f"), ("ppl", "ppl", ".3f"), ("ppl_ratio", "ppl/base", ".4f"),
           ("kld_mean", "KLD", ".4f"), ("kld_p99", "KLD 99%", ".3f"),
           ("same_top_p", "same top", ".3f"), ("rms_dp", "RMS dp", ".4f"),
           ("prefill_tokens_per_s", "prefill tok/s", ".0f"),
           ("decode_tokens_per_s", "decode tok/s", ".1f"), ("peak_rss_mb", "eval RSS MB", ".0f"),
           ("quantize_seconds", "quantize s", ".0f")]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def items(recipes: list[str], outputs: list[str], ggufs: list[str]) -> list[tuple[str, str, str]]:
    """(name, kind, path) for each thing compared; names unique."""
    out: list[tuple[str, str, str]] = []
    for kind, paths in (("recipe", recipes), ("output", outputs), ("gguf", ggufs)):
        for p in paths:
            out.append((Path(p).stem if kind != "output" else Path(p).name, kind, str(p)))
    names = [n for n, _, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise LowbitError(f"two things to compare are both called {dup!r}: rename a file")
    if not out:
        raise LowbitError("nothing to compare: give --recipes, --outputs or --gguf")
    for _, kind, p in out:
        if kind == "gguf" and not (Path(p).is_file() and Path(p).suffix == ".gguf"):
            raise LowbitError(f"--gguf {p}: not a .gguf file")
        if kind == "output" and not (Path(p) / "lowbit.json").is_file():
            raise LowbitError(f"--outputs {p}: not a lowbit output folder (no lowbit.json)")
    return out


def compare_job(model_arg: str, things: list[tuple[str, str, str]], report: Path, *,
                calibration: Calibration | None, data: str, windows: int, seq_len: int,
                speed: bool = False, dtype: str = "auto", progress: bool = True,
                note: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """Quantize and evaluate each of ``things`` (``items``) into ``report``; the rows."""
    report.mkdir(parents=True, exist_ok=True)
    recipes: dict[str, Recipe] = {n: load_recipe(p) for n, k, p in things if k == "recipe"}
    done_path = report / "rows.jsonl"
    done = {}
    if done_path.is_file():
        for line in done_path.read_text().splitlines():
            row = json.loads(line)
            done[row["name"]] = row
    kept = [n for n, _, _ in things if n in done]
    if kept:
        note(f"kept {len(kept)} finished row(s) from {done_path}: {', '.join(kept)}")
    bar = tqdm(total=len(things), initial=len(kept), desc="compare", unit="item",
               disable=not progress)
    rows = []
    for name, kind, path in things:
        if name in done:
            rows.append(done[name])
            continue
        row = {"name": name, "kind": kind}
        target = Path(path)
        if kind == "recipe":
            target = report / "runs" / name
            recipe = recipes[name]
            cal = calibration or Calibration(**recipe.calibration)
            meta = quantize_job(model_arg, recipe, target, cal, overwrite=True,
                                progress=progress, note=note, dtype=dtype)[3]
            row |= {"method": recipe.name, "quantize_seconds": meta["seconds"]}
        ev = eval_job(str(target), data, windows, seq_len, model_arg, speed and kind != "gguf",
                      progress=progress, dtype=dtype, note=note, llamacpp=kind == "gguf")
        if kind == "gguf":
            from lowbit.io.gguf.check import open_gguf

            reader = open_gguf(target)
            numel = sum(int(t.n_elements) for t in reader.tensors if len(t.shape) > 1)
            row |= {"method": "gguf", "bpw": 8 * sum(int(t.n_bytes) for t in reader.tensors
                                                     if len(t.shape) > 1) / numel}
        else:
            row.setdefault("method", ev.get("method"))
            row["bpw"] = ev.get("bpw")
        row |= {k: v for k, v in ev.items() if isinstance(v, (int, float, str))
                and k not in ("model", "method", "bpw")}
        row |= {"path": str(target), "size_mb": _size(target) / 1e6,
                "peak_rss_mb": ev["peak_rss_bytes"] / 2**20}
        rows.append(row)
        with done_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        bar.update(1)
    bar.close()
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both bits per weight and perplexity."""
    pts = sorted((r for r in rows if r.get("bpw") and r.get("ppl")),
                 key=lambda r: (r["bpw"], r["ppl"]))
    front, best = [], float("inf")
    for r in pts:
        if r["ppl"] < best:
            front.append(r)
            best = r["ppl"]
    return front


def write_report(rows: list[dict], report: Path, title: str) -> list[Path]:
    """report.json, report.md, report.html and (with matplotlib) plot.png."""
    from lowbit.io.atomic import atomic_output

    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    front = {r["name"] for r in pareto(rows)}
    written = []

    def write(name: str, text: str | bytes) -> None:
        with atomic_output(report / name, folder=False) as tmp:
            if isinstance(text, bytes):
                tmp.write_bytes(text)
            else:
                tmp.write_text(text)
        written.append(report / name)

    write("report.json", json.dumps({"title": title, "rows": rows}, indent=1))
    md_rows = [{k: (v if v is not None else "-") for k, v in r.items()} | (
        {"name": r["name"] + (" *" if r["name"] in front else "")}) for r in rows]
    md = [f"# {title}", "", "Rows marked * are on the Pareto frontier (no other row has both "
          "fewer bits per weight and a lower perplexity).", "", "| " +
          " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in md_rows:
        md.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |")
    write("report.md", "\n".join(md) + "\n")
    png = _plot(rows, front, title)
    if png is not None:
        write("plot.png", png)
    img = (f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" '
           'alt="perplexity against bits per weight">' if png else "")
    head = "".join(f"<th>{h}</th>" for _, h, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k), f)}</td>" for k, _, f in cols) +
                   "</tr>" for r in md_rows)
    write("report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>{title}"
          "</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}"
          "</style></head><body>" f"<h1>{title}</h1><p>Rows marked * are on the Pareto "
          f"frontier.</p><table><tr>{head}</tr>{body}</table>{img}</body></html>\n")
    return written


def _fmt(v, f: str) -> str:
    if v is None or v == "-":
        return "-"
    return format(v, f) if f and isinstance(v, (int, float)) else str(v)


def _plot(rows: list[dict], front: set[str], title: str) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    pts = [r for r in rows if r.get("bpw") and r.get("ppl")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        ax.scatter(r["bpw"], r["ppl"], color="tab:red" if r["name"] in front else "tab:blue")
        ax.annotate(r["name"], (r["bpw"], r["ppl"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    fr = sorted((r for r in pts if r["name"] in front), key=lambda r: r["bpw"])
    if len(fr) > 1:
        ax.plot([r["bpw"] for r in fr], [r["ppl"] for r in fr], color="tab:red", lw=1,
                label="Pareto frontier")
        ax.legend()
    ax.set_xlabel("bits per weight (quantized layers)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
