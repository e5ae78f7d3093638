"""Outputs written whole or not at all: temporaries of killed processes are cleared by the next
write, replacing leaves no hidden copy, concurrent replacements both finish."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from lowbit.errors import LowbitError
from lowbit.io import atomic
from lowbit.io.native import atomic_dir, is_lowbit_folder


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _killed_during_save(out: str) -> None:
    with atomic.atomic_output(atomic.Path(out), folder=True) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        os.kill(os.getpid(), signal.SIGKILL)


def test_kill_9_during_save_leaves_a_temporary_the_next_write_clears(tmp_path):
    out = tmp_path / "q"
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_killed_during_save, args=(str(out),))
    p.start()
    p.join()
    assert p.exitcode == -signal.SIGKILL
    left = _hidden(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".q.tmp-{p.pid}-")
    alive = tmp_path / f".q.tmp-{os.getppid()}-abcd"  # a live writer's: kept
    alive.mkdir()
    with atomic.atomic_output(out, folder=True) as tmp:
        (tmp / "lowbit.json").write_text("{}")
    assert _hidden(tmp_path) == [alive.name]
    assert (out / "lowbit.json").is_file()


def test_stale_files_of_dead_processes_are_cleared(tmp_path):
    dead = _dead_pid()
    for name in (f".m.gguf.tmp-{dead}-0a0b", f".m.gguf.old-{dead}-0c0d", ".m.gguf.tmp-x",
                 f".other.tmp-{dead}-0e0f"):
        (tmp_path / name).write_text("x")
    gone = atomic.clear_stale(tmp_path / "m.gguf")
    assert sorted(p.name for p in gone) == [f".m.gguf.old-{dead}-0c0d",
                                            f".m.gguf.tmp-{dead}-0a0b"]
    # not of this output, or not lowbit's naming: left alone
    assert _hidden(tmp_path) == [".m.gguf.tmp-x", f".other.tmp-{dead}-0e0f"]


def test_replacing_a_file_or_a_folder_leaves_no_hidden_copy(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_text("old")
    with atomic.atomic_output(f, folder=False) as tmp:
        tmp.write_text("new")
    assert f.read_text() == "new" and _hidden(tmp_path) == []
    d = tmp_path / "q"
    d.mkdir()
    (d / "lowbit.json").write_text('{"format": "lowbit-native"}')
    with atomic_dir(d, overwrite=True) as tmp:
        (tmp / "lowbit.json").write_text('{"format": "gptq"}')
    assert "gptq" in (d / "lowbit.json").read_text() and _hidden(tmp_path) == []


def test_a_failed_write_leaves_the_old_output_and_nothing_else(tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    (d / "lowbit.json").write_text('{"format": "lowbit-native"}')
    with pytest.raises(LowbitError, match="cannot write .*q: No space left"):
        with atomic_dir(d, overwrite=True) as tmp:
            (tmp / "a").write_text("partial")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert sorted(p.name for p in d.iterdir()) == ["lowbit.json"]


def test_overwrite_replaces_only_lowbits_outputs(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    with pytest.raises(LowbitError, match="not written by lowbit"):
        atomic_dir(tmp_path / "mine", overwrite=True).__enter__()
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", overwrite=True) as tmp:
        (tmp / "lowbit.json").write_text('{"format": "awq"}')
    assert is_lowbit_folder(tmp_path / "empty")
    assert not is_lowbit_folder(tmp_path / "mine")


def _replace_many(out: str, tag: str, n: int) -> None:
    for i in range(n):
        with atomic_dir(atomic.Path(out), overwrite=True) as tmp:
            (tmp / "lowbit.json").write_text('{"format": "lowbit-native"}')
            for k in range(20):
                (tmp / f"f{k}").write_text(f"{tag} {i}")


def test_concurrent_overwrites_both_finish_and_leave_one_whole_output(tmp_path):
    out = tmp_path / "q"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_replace_many, args=(str(out), t, 15)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert _hidden(tmp_path) == []
    texts = {(out / f"f{k}").read_text() for k in range(20)}
    assert len(texts) == 1  # one writer's whole output, never a mix


def test_an_output_moved_aside_by_a_concurrent_writer_is_not_refused(tmp_path):
    # the race CI met: another run renames ``out`` aside between our exists() and our look
    # inside it; what is gone cannot be "not lowbit's"
    out = tmp_path / "q"
    out.mkdir()
    (out / "lowbit.json").write_text('{"format": "lowbit-native"}')

    def moved_aside(p):
        p.rename(tmp_path / f".q{atomic.OLD}1-ab")
        return False

    atomic.check_replaceable(out, True, moved_aside, "rule")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    with pytest.raises(LowbitError, match="not written by lowbit"):
        atomic.check_replaceable(tmp_path / "mine", True, lambda p: False, "rule")
