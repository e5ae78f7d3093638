"""Data-parallel calibration on this machine: `lowbit quantize` in one process and with
`--nproc N`, the same windows, each run in its own process group. Prints the wall time of each,
the time of the quantization pass alone (`quantize_seconds`: capture, every block's statistics,
rounding; loading, sampling text and saving excluded), their ratio, and how far the outputs
differ (packed code bytes that differ, largest relative difference of any other tensor).

    python benchmarks/dist.py --nproc 2 --calib-samples 64

One process uses every core for its matrix products (torch's threads); N processes get
cores / N threads each (``OMP_NUM_THREADS``, as torchrun sets it). ``--threads T`` gives every
process T threads instead, the one process too: N processes then have N times the compute of
one, as N machines would, which is the scaling that adding machines buys.

    python benchmarks/dist.py --nproc 2 --calib-samples 64 --threads 1
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

from resume import run, run_options  # benchmarks/resume.py
from safetensors.torch import load_file


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    codes = differ = 0
    worst = 0.0
    for f in sorted(p.name for p in a.glob("*.safetensors")):
        x, y = load_file(a / f), load_file(b / f)
        for k in x:
            if k.endswith(("qweight", "weight_packed")):
                codes += x[k].numel()
                differ += int((x[k] != y[k]).sum())
            elif x[k].is_floating_point():
                d = (x[k].float() - y[k].float()).abs().max() / x[k].float().abs().max()
                worst = max(worst, float(d))
    return differ, codes, worst


def main() -> None:
    ap = run_options(__doc__, 64)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, help="threads of every process (default: the "
                    "cores, shared out among the processes)")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-dist-"))
    atexit.register(shutil.rmtree, tmp, True)  # scratch: gone when the run ends
    base = [sys.executable, "-m", "lowbit", "quantize", args.model, "--method", args.method,
            "--scheme", args.scheme, "--calib", args.calib, "--calib-samples",
            str(args.calib_samples), "--quiet", "--json", "-", "--no-resume"]
    rows = {}
    for n in (1, args.nproc):
        wall, res = run([*base, "--out", str(tmp / f"n{n}"), "--nproc", str(n)])
        rows[n] = (wall, res["quantize_seconds"])
        print(f"{n} process(es): wall {wall:.1f} s, quantization pass "
              f"{res['quantize_seconds']:.1f} s", flush=True)
    (w1, q1), (wn, qn) = rows[1], rows[args.nproc]
    print(f"ratio {args.nproc} : 1 process(es): wall {wn / w1:.2f}, quantization pass "
          f"{qn / q1:.2f}")
    differ, codes, worst = compare(tmp / "n1", tmp / f"n{args.nproc}")
    print(f"packed code bytes that differ: {differ} of {codes}; largest relative difference "
          f"of another tensor: {worst:.2e}")


if __name__ == "__main__":
    main()
