"""`lowbit compare`: recipes run and evaluated on the same windows, one report, finished rows
kept for an interrupted comparison."""

from __future__ import annotations

import json

from cli_helpers import lowbit_cli, one_line_error

from lowbit.compare import pareto


def test_compare_writes_the_report_and_keeps_finished_rows(tiny_ckpt, tmp_path):
    ckpt, text = tiny_ckpt
    for name, scheme in (("w2", "w2g32"), ("w4", "w4g32"), ("w8", "w8")):
        (tmp_path / f"{name}.yaml").write_text(f"steps:\n  - rtn: {{scheme: {scheme}}}\n")
    report = tmp_path / "report"
    args = ["compare", ckpt, "--recipes", tmp_path / "w2.yaml", "--recipes",
            tmp_path / "w4.yaml", "--data", text, "--windows", "2", "--eval-seq-len", "64",
            "--out", report, "--json", "-", "--quiet"]
    rows = json.loads(lowbit_cli(*args).out)
    assert [r["name"] for r in rows] == ["w2", "w4"]
    w2, w4 = rows
    assert w2["bpw"] < w4["bpw"] and w2["kld_mean"] > w4["kld_mean"] > 0
    assert {"ppl", "size_mb", "same_top_p", "quantize_seconds", "peak_rss_mb"} <= set(w4)
    for f in ("report.md", "report.html", "report.json", "plot.png", "rows.jsonl"):
        assert (report / f).stat().st_size > 0, f
    assert "| w4 *" in (report / "report.md").read_text()  # on the frontier
    # run again with one more recipe and a finished output: the two rows are kept, not redone
    r = lowbit_cli(*args[:-3], "--recipes", tmp_path / "w8.yaml", "--outputs",
                   report / "runs" / "w4", "--json", "-", "--quiet", ok=False)
    one_line_error(r, "both called 'w4'")  # the output's name clashes with the recipe's
    rows2 = json.loads(lowbit_cli(*args[:-3], "--recipes", tmp_path / "w8.yaml", "--json", "-",
                                  "--quiet").out)
    assert [r["name"] for r in rows2] == ["w2", "w4", "w8"]
    assert rows2[0] == w2 and rows2[1] == w4  # kept as they were
    front = pareto(rows2)  # fewer bits, then lower perplexity along it; no row beats it on both
    pairs = zip(front, front[1:], strict=False)
    assert all(a["bpw"] < b["bpw"] and a["ppl"] > b["ppl"] for a, b in pairs)
    assert not any(r["bpw"] <= f["bpw"] and r["ppl"] < f["ppl"] for f in front for r in rows2)


def test_compare_refuses_what_it_cannot_compare(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    one_line_error(lowbit_cli("compare", ckpt, "--out", tmp_path / "r", ok=False),
                   "nothing to compare")
    one_line_error(lowbit_cli("compare", ckpt, "--gguf", tmp_path / "x.gguf", "--out",
                              tmp_path / "r", ok=False), "not a .gguf file")
