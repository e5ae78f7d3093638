"""Running the command line in-process (the same code path as the ``lowbit`` script, whose
``main`` only adds ``sys.exit``), and out of process where the process boundary matters."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass


@dataclass
class Run:
    code: int
    out: str
    err: str


def lowbit_cli(*args, ok: bool = True) -> Run:
    from lowbit.cli import run

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run([str(a) for a in args])
    r = Run(code, out.getvalue(), err.getvalue())
    if ok:
        assert code == 0, f"lowbit {' '.join(map(str, args))}: exit {code}\n{r.err[-3000:]}"
    return r


def lowbit_process(*args, ok: bool = True) -> Run:
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return Run(p.returncode, p.stdout, p.stderr)


def one_line_error(r: Run, message: str, code: int = 2) -> None:
    """Exit code ``code`` (2: a lowbit error) and one line on stderr, ``error: ...`` containing
    ``message``."""
    lines = r.err.strip().splitlines()
    assert r.code == code, r.err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err[-3000:]
    assert message in lines[0], lines[0]
