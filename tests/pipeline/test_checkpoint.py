"""Crash safety: a run interrupted after any block and started again with its checkpoint
ends bit-identical to the uninterrupted run (tensors, rows, kept statistics)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from cli_helpers import lowbit_cli
from conftest import tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.pipeline.checkpoint import RunCheckpoint
from lowbit.recipe import shorthand

TIMING = {"seconds", "time", "prune_seconds"}


class Crash(Exception):
    pass


def _state(model, res):
    """Everything a run leaves: the model's tensors, each layer's stored tensors, the rows
    (without timings), the kept statistics."""
    weights = {}
    for name, w in res.weights.items():
        tensors = w.to_tensors()
        weights |= {f"{name}.{k}": v.clone() for k, v in tensors.items()}
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in res.rows]
    stats = {n: (st.absmax.clone(), st.abs_sum.clone(), st.n) for n, st in res.stats.items()}
    return model.state_dict(), weights, json.loads(json.dumps(rows)), stats


def _equal(a, b):
    sd_a, w_a, rows_a, st_a = a
    sd_b, w_b, rows_b, st_b = b
    assert sd_a.keys() == sd_b.keys() and w_a.keys() == w_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), k
    assert rows_a == rows_b
    assert st_a.keys() == st_b.keys()
    for k in st_a:
        assert torch.equal(st_a[k][0], st_b[k][0]) and torch.equal(st_a[k][1], st_b[k][1])
        assert st_a[k][2] == st_b[k][2]


def _run(family, recipe, windows, folder=None, crash_after=None, monkeypatch=None,
         resume="auto"):
    model = tiny_model(family)
    if crash_after is not None:
        real = RunCheckpoint.save_block

        def save_then_crash(self, bi, *a, **k):
            real(self, bi, *a, **k)
            if bi == crash_after:
                raise Crash

        monkeypatch.setattr(RunCheckpoint, "save_block", save_then_crash)
    try:
        res = lowbit.quantize(model, recipe, windows, progress=False, checkpoint=folder,
                              resume=resume)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    return _state(model, res)


CASES = [
    ("llama", "gptq", "w4g32"),  # the resumed schedule
    ("gpt2", "gptq", "w4g32"),  # blocks re-run per group, Conv1D
    ("gemma2", "gptq", "w4g32"),  # per-kind block arguments
    ("qwen2_moe", "gptq", "w4g32"),  # experts, statistics sources
    ("llama", "awq", "w4g32"),  # a transform with its sample stream
    ("llama", "smoothquant", "w8a8"),  # a replacer and kept statistics
    ("llama", "rtn", "w4g32"),  # data-free: no inputs stored
]


@pytest.mark.parametrize("family,method,scheme", CASES)
def test_resume_after_a_crash_is_bit_identical(family, method, scheme, windows, tmp_path,
                                               monkeypatch):
    recipe = shorthand(method, scheme)
    calib = windows if method != "rtn" else None
    ref = _run(family, recipe, calib)
    folder = tmp_path / "ck"
    with pytest.raises(Crash):
        _run(family, recipe, calib, folder, crash_after=0, monkeypatch=monkeypatch)
    state = json.loads((folder / "state.json").read_text())
    assert state["blocks"] == 1
    assert (folder / "block-00000.safetensors").is_file()
    torch.manual_seed(123)  # the random state is restored from the checkpoint, not inherited
    resumed = _run(family, recipe, calib, folder, resume="require")
    _equal(ref, resumed)
    assert not folder.exists()  # given as a path: removed once the run completed


def test_a_crash_while_writing_a_block_resumes_from_the_previous_one(windows, tmp_path,
                                                                     monkeypatch):
    """state.json is the commit point: block 1's files written without it count for nothing."""
    recipe = shorthand("gptq", "w4g32")
    ref = _run("llama", recipe, windows)
    folder = tmp_path / "ck"
    real = RunCheckpoint._write_state

    def die_on_second_commit(self):
        if self.finished == 2:
            raise Crash
        real(self)

    monkeypatch.setattr(RunCheckpoint, "_write_state", die_on_second_commit)
    with pytest.raises(Crash):
        lowbit.quantize(tiny_model("llama"), recipe, windows, progress=False, checkpoint=folder)
    monkeypatch.undo()
    assert json.loads((folder / "state.json").read_text())["blocks"] == 1
    assert (folder / "inputs-00002.safetensors").is_file()  # written, not committed
    notes = []
    model = tiny_model("llama")
    res = lowbit.quantize(model, recipe, windows, progress=False,
                          checkpoint=RunCheckpoint(folder, note=notes.append))
    assert notes == [f"resuming from {folder}: blocks 0-0 of 2 are finished"]
    _equal(ref, _state(model, res))


def test_another_run_is_not_resumed(windows, tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    with pytest.raises(Crash):
        _run("llama", shorthand("gptq", "w4g32"), windows, folder, crash_after=0,
             monkeypatch=monkeypatch)
    # another recipe: --resume refuses, naming what differs; auto starts over and says so
    with pytest.raises(LowbitError, match=r"cannot resume: .* \(its steps differ\)"):
        _run("llama", shorthand("gptq", "w3g32"), windows, folder, resume="require")
    notes = []
    model = tiny_model("llama")
    lowbit.quantize(model, shorthand("gptq", "w4g32"), windows[:3], progress=False,
                    checkpoint=RunCheckpoint(folder, note=notes.append))
    assert len(notes) == 1 and "(its calibration windows differ); starting over" in notes[0]
    # another model (other weights, same shapes)
    with pytest.raises(Crash):
        _run("llama", shorthand("gptq", "w4g32"), windows, folder, crash_after=0,
             monkeypatch=monkeypatch)
    other = tiny_model("llama", seed=1)
    with pytest.raises(LowbitError, match="model weights differ"):
        lowbit.quantize(other, shorthand("gptq", "w4g32"), windows, progress=False,
                        checkpoint=RunCheckpoint(folder, mode="require"))
    with pytest.raises(LowbitError, match="no checkpoint"):
        lowbit.quantize(other, shorthand("gptq", "w4g32"), windows, progress=False,
                        checkpoint=RunCheckpoint(tmp_path / "none", mode="require"))


def test_a_damaged_checkpoint_is_a_one_line_error(windows, tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    with pytest.raises(Crash):
        _run("llama", shorthand("gptq", "w4g32"), windows, folder, crash_after=0,
             monkeypatch=monkeypatch)
    f = folder / "block-00000.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(LowbitError, match="block-00000.safetensors is damaged.*--no-resume"):
        _run("llama", shorthand("gptq", "w4g32"), windows, folder)


KILLER = """
import os, signal, sys
from lowbit.pipeline.checkpoint import RunCheckpoint
from lowbit.cli import run

real = RunCheckpoint.save_block
def save_then_kill(self, bi, *a, **k):
    real(self, bi, *a, **k)
    if bi == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
RunCheckpoint.save_block = save_then_kill
sys.exit(run(sys.argv[1:]))
"""


def test_cli_run_killed_by_sigkill_resumes_bit_identical(tiny_ckpt, tmp_path):
    """`lowbit quantize` killed with SIGKILL after a block, then the same
    command again: the output equals an uninterrupted run's, and no checkpoint is left."""
    from safetensors.torch import load_file

    ckpt, text = tiny_ckpt
    args = [str(ckpt), "--method", "gptq", "--scheme", "w4g32", "--calib", str(text),
            "--calib-samples", "4", "--seq-len", "64", "--quiet", "--format", "native"]
    lowbit_cli("quantize", *args, "--out", tmp_path / "ref")
    out = tmp_path / "q"
    kill_at = 0  # of 2 blocks: after the last one, nothing would be left to resume but saving
    p = subprocess.run([sys.executable, "-c", KILLER, "quantize", *args, "--out", str(out)],
                       env=os.environ | {"KILL_AFTER": str(kill_at)}, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    folder = tmp_path / "q.lowbit-resume"
    assert json.loads((folder / "state.json").read_text())["blocks"] == kill_at + 1
    assert not out.exists()
    r = lowbit_cli("quantize", *args, "--out", out, "--resume")
    assert f"blocks 0-{kill_at} of 2 are finished" in r.err
    assert not folder.exists()
    a = load_file(tmp_path / "ref" / "lowbit.safetensors")
    b = load_file(out / "lowbit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_resume_flags(tiny_ckpt, tmp_path):
    from cli_helpers import one_line_error

    ckpt, text = tiny_ckpt
    r = lowbit_cli("quantize", ckpt, "--method", "rtn", "--out", tmp_path / "q", "--resume",
                   ok=False)
    one_line_error(r, f"cannot resume: no checkpoint in {tmp_path / 'q.lowbit-resume'}")
    assert not (tmp_path / "q.lowbit-resume").exists()


def _mapped_files() -> dict[tuple[int, int], str]:
    out = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out[(lo, hi)] = parts[5]
    return out


def test_finished_blocks_are_held_in_their_checkpoint_files(windows, tmp_path):
    """After each block, its QLinears hold their stored tensors as maps of the block's file:
    what memory holds of the quantized model does not grow with the model's size."""
    model = tiny_model("llama")
    folder = tmp_path / "ck"
    res = lowbit.quantize(model, shorthand("gptq", "w4g32"), windows, progress=False,
                          checkpoint=RunCheckpoint(folder))
    maps = _mapped_files()
    for name, mod in res.weights.modules().items():
        ptr = mod.qweight.untyped_storage().data_ptr()
        files = [f for (lo, hi), f in maps.items() if lo <= ptr < hi]
        block = int(name.split(".")[2])
        assert files == [str(folder / f"block-{block:05d}.safetensors")], name


def test_a_full_disk_while_saving_keeps_the_blocks_for_the_rerun(tiny_ckpt, tmp_path,
                                                                  monkeypatch):
    """Saving fails (no space): the one-line error says where the finished blocks are; the
    same command, once there is space, goes on from them and writes the uninterrupted run's
    output."""
    import errno

    from safetensors.torch import load_file

    from lowbit.io.shards import ShardWriter

    ckpt, text = tiny_ckpt
    args = ["quantize", ckpt, "--method", "gptq", "--scheme", "w4g32", "--calib", text,
            "--calib-samples", "4", "--seq-len", "64", "--quiet", "--format", "native"]
    lowbit_cli(*args, "--out", tmp_path / "ref")

    def full(self, name, t):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "add", full)
    r = lowbit_cli(*args, "--out", tmp_path / "q", ok=False)
    monkeypatch.undo()
    folder = tmp_path / "q.lowbit-resume"
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert f"2 finished blocks are kept in {folder}: the same command goes on" in r.err
    r = lowbit_cli(*args, "--out", tmp_path / "q")
    assert "blocks 0-1 of 2 are finished" in r.err and not folder.exists()
    a = load_file(tmp_path / "ref" / "lowbit.safetensors")
    b = load_file(tmp_path / "q" / "lowbit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,scheme", [("w8a8", "w8a8-fp8-static"), ("rtn", "nvfp4")])
def test_resume_of_other_stored_forms(method, scheme, windows, tmp_path, monkeypatch):
    """FP8 tensors (safetensors' F8_E4M3) and NVFP4's two-level scales go through the
    checkpoint files too."""
    recipe = shorthand(method, scheme)
    calib = windows if method != "rtn" else None
    ref = _run("llama", recipe, calib)
    folder = tmp_path / "ck"
    with pytest.raises(Crash):
        _run("llama", recipe, calib, folder, crash_after=0, monkeypatch=monkeypatch)
    _equal(ref, _run("llama", recipe, calib, folder, resume="require"))


def test_missing_inputs_are_a_one_line_error(windows, tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    with pytest.raises(Crash):
        _run("llama", shorthand("gptq", "w4g32"), windows, folder, crash_after=0,
             monkeypatch=monkeypatch)
    (folder / "inputs-00001.safetensors").unlink()
    with pytest.raises(LowbitError, match="lacks the inputs of block 1; run with --no-resume"):
        _run("llama", shorthand("gptq", "w4g32"), windows, folder)


@pytest.mark.parametrize("steps", ["unstructured", "structured", "structured-alone"])
def test_pruned_runs_resume_bit_identical(steps, windows, tmp_path, monkeypatch):
    """Pruned blocks come back as they were written, narrower MLPs included."""
    from lowbit.methods.gptq import GPTQ
    from lowbit.methods.prune import Prune
    from lowbit.methods.structured import PruneStructured

    recipe = {"unstructured": [Prune(method="wanda", sparsity="2:4"), GPTQ(scheme="w4g32")],
              "structured": [PruneStructured(ratio=0.25), GPTQ(scheme="w4g32")],
              "structured-alone": [PruneStructured(ratio=0.25)]}[steps]
    ref = _run("llama", recipe, windows)
    folder = tmp_path / "ck"
    with pytest.raises(Crash):
        _run("llama", recipe, windows, folder, crash_after=0, monkeypatch=monkeypatch)
    _equal(ref, _run("llama", recipe, windows, folder, resume="require"))
