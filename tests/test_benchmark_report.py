"""`benchmarks/formats.py --report`: the BENCHMARKS.md table and plot rebuilt from saved rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "formats.py"


def _row(fmt: str, method: str, ppl: float, **kw) -> dict:
    return {"format": fmt, "method": method, "bpw": kw.pop("bpw", 4.5), "ppl": ppl,
            "kl_mean": kw.pop("kl", 0.25), "top1": 0.7, "saturated": kw.pop("sat", 0),
            "eval_windows": kw.pop("windows", 16), **kw}


def _report(tmp_path: Path, *files: Path, plot: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--report", *map(str, files)]
    if plot:
        cmd += ["--plot", str(tmp_path / "out.png")]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=SCRIPT.parent, timeout=300)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path]:
    doc = tmp_path / "rtn.json"
    doc.write_text(json.dumps({"settings": {"eval_windows": 16}, "rows": [
        {"format": "fp32", "method": "base", "bpw": 32.0, "ppl": 36.077},
        _row("nf4", "rtn", 45.671, kl=0.283),
        _row("mxfp4", "rtn", 61.838, bpw=4.25, sat=933665),
    ]}))
    rows = tmp_path / "gptq.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        _row("nf4", "gptq", 43.2),
        _row("mxfp4", "gptq", 70.0, bpw=4.25),            # worse than RTN: not bold
        _row("mxfp4-mse", "gptq", 47.697, bpw=4.25),      # a scheme outside the default list
        _row("ternary", "rtn", 1.012e8, bpw=2.0),
    ]) + "\n")
    return doc, rows


def test_report_merges_json_and_jsonl_into_one_row_per_format(tmp_path, saved):
    out = _report(tmp_path, *saved)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "| fp32 base | 32 | 36.077 |" in out.stdout
    nf4 = next(line for line in lines if line.startswith("| nf4 |"))
    assert nf4.split(" | ")[1:4] == ["4.500", "45.671", "0.2830"]
    assert "**43.200**" in nf4  # GPTQ beat RTN
    mx = next(line for line in lines if line.startswith("| mxfp4 |"))
    assert "| 933665 | 70.000 |" in mx  # clipped count from RTN, GPTQ worse so not bold
    assert any(line.startswith("| mxfp4-mse | 4.250 | – |") for line in lines)
    assert "| 1.012e+08 |" in out.stdout
    png = (tmp_path / "out.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_rows_from_different_window_counts(tmp_path, saved):
    doc, rows = saved
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(_row("sq3", "rtn", 175.4, windows=64)) + "\n")
    out = _report(tmp_path, doc, rows, other, plot=False)
    assert out.returncode != 0
    assert "different window counts: [16, 64]" in out.stderr


def test_report_needs_a_base_row(tmp_path, saved):
    _, rows = saved
    out = _report(tmp_path, rows, plot=False)
    assert out.returncode != 0
    assert "needs a base row" in out.stderr
