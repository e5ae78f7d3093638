"""Data-parallel calibration: `lowbit quantize --nproc 2` (two processes, gloo) gives the
one-process result, up to the order of fp32 summation of the statistics."""

import json

import pytest
import torch
from cli_helpers import lowbit_process, one_line_error
from safetensors.torch import load_file

from lowbit.pipeline.dist import share, sync_stats, world
from lowbit.pipeline.stats import InputStats


def _compare(a_dir, b_dir):
    a, b = load_file(a_dir / "lowbit.safetensors"), load_file(b_dir / "lowbit.safetensors")
    assert a.keys() == b.keys()
    codes = differ = 0
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("qweight"):  # packed codes: a code may flip where the Hessians' fp32
            codes += x.numel()  # sums (per share, then across shares) round differently
            differ += int((x != y).sum())
        else:
            assert torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-6), k
    assert differ <= 0.01 * codes, f"{differ} of {codes} packed bytes differ"


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])
def test_two_processes_give_the_one_process_result(tiny_ckpt, tmp_path, method):
    ckpt, text = tiny_ckpt
    args = ["quantize", ckpt, "--method", method, "--scheme", "w4g32", "--calib", text,
            "--calib-samples", "6", "--seq-len", "64", "--quiet", "--format", "native"]
    lowbit_process(*args, "--out", tmp_path / "one")
    r = lowbit_process(*args, "--out", tmp_path / "two", "--nproc", "2", "--json", "-")
    summary = json.loads(r.out)  # rank 0 alone reports: one JSON document
    assert summary["out"] == str(tmp_path / "two") and summary["layers"] == 14
    _compare(tmp_path / "one", tmp_path / "two")
    rows = [json.loads(ln) for ln in (tmp_path / "two" / "layers.jsonl").read_text().splitlines()]
    assert {r["tokens"] for r in rows if "tokens" in r} == {6 * 64}  # every rank's tokens
    assert not (tmp_path / "two.lowbit-resume").exists()


def test_a_failing_process_is_one_line(tiny_ckpt, tmp_path):
    ckpt, text = tiny_ckpt
    r = lowbit_process("quantize", ckpt, "--method", "gptq", "--calib", text,
                       "--calib-samples", "1", "--seq-len", "64", "--quiet",
                       "--out", tmp_path / "q", "--nproc", "2", ok=False)
    one_line_error(r, "1 calibration windows cannot be shared by 2 processes")
    assert not (tmp_path / "q").exists()


def test_one_process_is_the_identity(windows):
    assert world() == (0, 1)
    assert share(windows) is windows
    st = InputStats(4, {"hessian"})
    st.add(torch.randn(10, 4))
    h = st.h.clone()
    assert sync_stats(st) is st and torch.equal(st.h, h) and st.n == 10


@pytest.mark.slow
def test_torchrun_runs_the_same_command(tiny_ckpt, tmp_path):
    """The documented torchrun form (what several machines run) gives --nproc's output."""
    import subprocess
    import sys

    ckpt, text = tiny_ckpt
    args = ["quantize", str(ckpt), "--method", "gptq", "--scheme", "w4g32", "--calib",
            str(text), "--calib-samples", "4", "--seq-len", "64", "--quiet", "--format",
            "native"]
    lowbit_process(*args, "--out", tmp_path / "nproc", "--nproc", "2")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "lowbit", *args, "--out",
                        str(tmp_path / "torchrun")], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(tmp_path / "nproc" / "lowbit.safetensors")
    b = load_file(tmp_path / "torchrun" / "lowbit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
