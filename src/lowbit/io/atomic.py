"""Outputs written whole or not at all.

Every output is written beside its target under a hidden temporary name that carries the
writer's process id, ``.NAME.tmp-PID-RANDOM``, and renamed into place at the end: a failure
removes the temporary, and a process killed outright (``kill -9``, power loss) leaves one that
the next write of the same target removes once no process of that id is alive. A replaced
output is first renamed aside (``.NAME.old-PID-RANDOM``) and removed once the new one is in
place; two runs replacing the same output concurrently both finish, the last rename winning.

``--overwrite`` replaces only what lowbit wrote: the caller says what that is (``ours``); an
empty folder holds nothing to lose and may be replaced too.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError

TMP, OLD = ".tmp-", ".old-"
RENAME_ATTEMPTS = 20  # concurrent writers of one output: each attempt moves the other's aside


def temp_path(out: Path, kind: str = TMP) -> Path:
    """A hidden name beside ``out`` recording this process: ``.NAME.tmp-PID-RANDOM``."""
    return out.parent / f".{out.name}{kind}{os.getpid()}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _writer_pid(name: str, prefix: str) -> int | None:
    for kind in (TMP, OLD):
        if name.startswith(prefix + kind):
            pid = name[len(prefix + kind):].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def remove(path: Path) -> None:
    """Remove a file or a folder tree; gone already is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def clear_stale(out: Path) -> list[Path]:
    """Remove the temporaries of ``out`` left by processes that are no longer alive."""
    out = Path(out)
    prefix = f".{out.name}"
    gone = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return gone
    for p in entries:
        pid = _writer_pid(p.name, prefix)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            try:
                remove(p)
            except OSError:
                continue  # not ours to remove (permissions): leave it
            gone.append(p)
    return gone


def not_a_folder(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` (itself included) that is not a folder."""
    for p in [path, *path.parents]:
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_output_file(path: str | Path, what: str = "output") -> None:
    """Fail early (before any long run) when a file cannot be written at ``path``: its folder
    must exist and be writable, and ``path`` must not be a folder."""
    p = Path(path)
    parent = p.parent
    blocker = not_a_folder(parent)
    if blocker is not None:
        raise LowbitError(f"cannot write {what} {p}: {blocker} is not a folder")
    if not parent.is_dir():
        raise LowbitError(f"cannot write {what} {p}: folder {parent} does not exist")
    if p.is_dir():
        raise LowbitError(f"cannot write {what} {p}: it is a folder")
    if not os.access(parent, os.W_OK):
        raise LowbitError(f"cannot write {what} {p}: {parent} is not writable")


def check_replaceable(out: Path, overwrite: bool, ours: Callable[[Path], bool],
                      rule: str) -> None:
    """An existing ``out`` is replaced only with ``overwrite`` and only when lowbit wrote it
    (``ours``; ``rule`` says what that means, for the message) or it is an empty folder."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise LowbitError(f"{out} exists; pass --overwrite to replace it")
    for _ in range(RENAME_ATTEMPTS):
        try:
            empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        except FileNotFoundError:
            empty = False
        if empty or ours(out):
            return
        # another lowbit run replacing ``out`` moves it aside for a moment: gone is fine, and
        # a folder that came back is looked at again
        if not (out.exists() or out.is_symlink()):
            return
        if not _moved_aside_meanwhile(out):
            break
    raise LowbitError(f"{out} was not written by lowbit ({rule}); --overwrite replaces "
                      "only lowbit's outputs: remove it yourself or choose another path")


def _moved_aside_meanwhile(out: Path) -> bool:
    """Whether a concurrent writer of ``out`` is at work (its temporaries are beside it)."""
    prefix = f".{out.name}"
    try:
        return any(_writer_pid(p.name, prefix) not in (None, os.getpid())
                   for p in out.parent.iterdir())
    except OSError:
        return False


def check_writable(out: Path, overwrite: bool, ours: Callable[[Path], bool],
                   rule: str) -> None:
    """Fail early (before any long run) when the output folder ``out`` cannot be written: it
    exists (without ``overwrite``, or not lowbit's), or its folder cannot be made or written."""
    out = Path(out)
    check_replaceable(out, overwrite, ours, rule)
    parent = out.parent
    blocker = not_a_folder(parent)
    if blocker is not None:
        raise LowbitError(f"cannot create {parent}: {blocker} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LowbitError(f"cannot create {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise LowbitError(f"cannot write to {parent}")


def _replace(tmp: Path, out: Path, folder: bool) -> None:
    """Rename ``tmp`` to ``out``. A file replaces a file in the rename itself; a folder moves
    an existing ``out`` aside first and removes it after, and another process putting its own
    ``out`` in place meanwhile is moved aside in turn."""
    if not folder:
        os.replace(tmp, out)
        return
    for _ in range(RENAME_ATTEMPTS):
        old = None
        if out.exists() or out.is_symlink():
            old = temp_path(out, OLD)
            try:
                os.rename(out, old)
            except FileNotFoundError:
                old = None  # a concurrent writer moved it first
        try:
            os.rename(tmp, out)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise
        finally:
            if old is not None:
                remove(old)
    raise LowbitError(f"cannot replace {out}: other processes keep writing it")


@contextmanager
def atomic_output(out: Path, folder: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``out`` (a new folder, or a file name to write); on
    success it replaces ``out`` in one rename, on any failure it is removed. Stale temporaries
    of ``out`` are cleared first; an OSError becomes a LowbitError naming ``out``."""
    out = Path(out)
    clear_stale(out)
    tmp = temp_path(out)
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        _replace(tmp, out, folder)
    except OSError as e:
        _discard(tmp)
        raise LowbitError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    try:
        remove(tmp)
    except OSError:
        pass  # left for the next run's clear_stale
