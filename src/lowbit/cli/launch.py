"""``--nproc N``: the command line run again in N processes on this machine, as ``torchrun
--standalone --nproc-per-node N -m lowbit ...`` would, with lowbit's error contract kept: rank 0
shows its output, every rank's threads are the machine's cores shared out, and when one rank
fails the others are stopped and its one-line error is the command's (no launcher traceback,
no rank left waiting in a collective)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import click

from lowbit.errors import LowbitError

EXIT_ERROR = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_nproc(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(nproc: int) -> int:
    """Run ``lowbit.cli.ARGS`` (without ``--nproc``) in ``nproc`` processes; the first failing
    rank's exit code (its error line shown), or 0."""
    from lowbit import cli

    if nproc < 1:
        raise LowbitError(f"--nproc must be at least 1, not {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LowbitError("--nproc inside a torchrun process group; give one or the other")
    args = _without_nproc(cli.ARGS)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    procs, logs = [], []
    try:
        for rank in range(nproc):
            e = env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}
            log = None if rank == 0 else tempfile.TemporaryFile("w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "lowbit", *args], env=e,
                                          stdout=None if rank == 0 else subprocess.DEVNULL,
                                          stderr=log))
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
        end = time.monotonic() + 5  # the others often fail the same way: let them say so
        while failed and time.monotonic() < end and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        codes = [p.poll() for p in procs]
    except KeyboardInterrupt:
        failed = []
        codes = [130] * nproc
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
    if not failed:
        return codes[0] or 0
    if codes[0] is not None and codes[0] > 0:
        return codes[0]  # rank 0's own error line is on stderr
    rank = next((i for i in failed if codes[i] is not None and codes[i] > 0), failed[0])
    code = codes[rank]
    if code is not None and code < 0:  # killed (the OOM killer ...): no line of its own
        click.echo(f"error: process {rank} of {nproc} was killed by signal {-code}", err=True)
        return EXIT_ERROR
    logs[rank].seek(0)
    lines = [ln for ln in logs[rank].read().splitlines() if ln.strip()]
    msg = lines[-1] if lines else f"error: exit code {code}"
    click.echo(f"{msg} (process {rank} of {nproc})", err=True)
    return code
