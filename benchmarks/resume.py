"""Crash and resume on the real model: `lowbit quantize` (GPTQ) run once uninterrupted, once
killed with SIGKILL when a (seeded) random block has finished and then started again with the
same command. Prints the uninterrupted time, the killed run's and the resumed run's, the time
lost to the crash (killed + resumed - uninterrupted), the time spent writing checkpoints,
and whether the two outputs are bit-identical.

    python benchmarks/resume.py --calib-samples 32 --seed 0

The kill happens from outside, as an OOM killer or a power cut would: the script watches the
run's checkpoint (``OUT.lowbit-resume/state.json``) and sends SIGKILL as soon as it records
the chosen block.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *args]


def run(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, json.loads(p.stdout)


def killed_at(cmd: list[str], state: Path, block: int) -> float:
    """Start ``cmd``, SIGKILL it once ``state`` records ``block + 1`` finished blocks."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None:
        try:
            if json.loads(state.read_text())["blocks"] > block:
                p.send_signal(signal.SIGKILL)
                p.wait()
                return time.perf_counter() - t0
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    sys.exit(f"the run ended (exit {p.returncode}) before block {block} finished")


def outputs_equal(a: Path, b: Path) -> bool:
    fa = sorted(p.name for p in a.glob("*.safetensors"))
    if fa != sorted(p.name for p in b.glob("*.safetensors")):
        return False
    for name in fa:
        x, y = load_file(a / name), load_file(b / name)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def run_options(doc: str, samples: int) -> argparse.ArgumentParser:
    """The options of a benchmark that runs `lowbit quantize` (shared with dist.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--calib", default=str(WIKI) if WIKI.is_file() else "builtin",
                    help="calibration text (default: WikiText-2 test, so no time goes into "
                         "sampling text)")
    ap.add_argument("--calib-samples", type=int, default=samples)
    return ap


def main() -> None:
    ap = run_options(__doc__, 32)
    ap.add_argument("--seed", type=int, default=0, help="chooses the block after which to kill")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-resume-"))
    atexit.register(shutil.rmtree, tmp, True)  # scratch: gone when the run ends
    common = [args.model, "--method", args.method, "--scheme", args.scheme,
              "--calib", args.calib, "--calib-samples", str(args.calib_samples), "--quiet",
              "--json", "-"]
    ref_s, ref = run(lowbit("quantize", *common, "--out", str(tmp / "ref")))
    blocks = json.loads((tmp / "ref" / "config.json").read_text())["num_hidden_layers"]
    block = random.Random(args.seed).randrange(blocks - 1)
    out = tmp / "q"
    state = out.with_name(out.name + ".lowbit-resume") / "state.json"
    kill_s = killed_at(lowbit("quantize", *common, "--out", str(out)), state, block)
    res_s, res = run(lowbit("quantize", *common, "--out", str(out)))
    same = outputs_equal(tmp / "ref", out)
    print(f"model {args.model}, {args.method} {args.scheme}, {args.calib_samples} windows")
    print(f"uninterrupted run: {ref_s:.1f} s (writing checkpoints: "
          f"{ref['checkpoint_seconds']:.1f} s)")
    print(f"killed after block {block} of {blocks}: {kill_s:.1f} s; resumed run: {res_s:.1f} s "
          f"({res.get('resumed_blocks', 0)} blocks restored)")
    print(f"time lost to the crash: {kill_s + res_s - ref_s:.1f} s")
    print(f"outputs bit-identical: {same}")
    os.system(f"rm -rf {tmp}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
