"""What pruning buys on a CPU: batch-1 prefill (512 tokens) and decode (128 tokens) speed of
SmolLM2-135M dense, with 50% of its block weights zeroed (unstructured and 2:4: the same dense
shapes, so no kernel runs faster), and 25% smaller by whole MLP channels
(``--prune-structured 0.25``), each in fp32 and as RTN w4g32 through lowbit's kernels. Every
configuration runs in its own process (``runtime_speed.py --one``), interleaved ``--repeat``
times, keeping each one's fastest decode; ratios are against the dense model of the same
precision in the same run.

    python benchmarks/pruning_speed.py --threads 1,2 --repeat 3
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from runtime_speed import WIKI, lowbit, run_one


def build(tmp: Path) -> list[tuple[str, str, str]]:
    """(name, model folder, dtype) of every configuration."""
    calib = ["--calib", str(WIKI), "--calib-offset", "100", "--calib-samples", "32"] \
        if WIKI.is_file() else ["--calib-samples", "32"]
    runs = {
        "magnitude-0.5": ["--method", "none", "--prune", "magnitude", "--sparsity", "0.5"],
        "wanda-2:4": ["--method", "none", "--prune", "wanda", "--sparsity", "2:4", *calib],
        "structured-0.25": ["--method", "none", "--prune-structured", "0.25", *calib],
        "w4g32": ["--method", "rtn", "--scheme", "w4g32"],
        "w4g32 wanda-2:4": ["--method", "rtn", "--scheme", "w4g32", "--prune", "wanda",
                            "--sparsity", "2:4", *calib],
        "w4g32 structured-0.25": ["--method", "rtn", "--scheme", "w4g32",
                                  "--prune-structured", "0.25", *calib],
    }
    for name, args in runs.items():
        subprocess.run(lowbit("quantize", "smollm2-135m", *args, "--format", "native",
                              "--out", tmp / name.replace(" ", "_"), "--quiet"), check=True)
    out = [("fp32 dense", "smollm2-135m", "fp32")]
    out += [(f"fp32 {n}", str(tmp / n), "fp32") for n in ("magnitude-0.5", "wanda-2:4",
                                                           "structured-0.25")]
    out += [(n, str(tmp / n.replace(" ", "_")), "fp32") for n in ("w4g32", "w4g32 wanda-2:4",
                                                                  "w4g32 structured-0.25")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="append one JSON line per configuration and thread count")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-prune-speed-"))
    atexit.register(shutil.rmtree, tmp, True)
    configs = build(tmp)
    rows: dict = {}
    for rep in range(a.repeat):
        for threads in map(int, a.threads.split(",")):
            for name, model, dtype in configs:
                res = run_one(name, model, dtype, "auto", threads)
                best = rows.get((name, threads))
                if best is None or res["decode"] > best["decode"]:
                    rows[(name, threads)] = res
                print(f"{threads} thr  {name:24s} prefill {res['prefill']:7.1f} tok/s  decode "
                      f"{res['decode']:6.1f} tok/s  Linears {res['linear_bytes'] / 2**20:6.1f} "
                      f"MiB  ppl(prompt) {res['ppl_dense']:.3f}  (run {rep + 1})", flush=True)
    print(f"\nratios against the dense model of the same precision (same threads, fastest of "
          f"{a.repeat})")
    out = open(a.json, "a") if a.json else None
    for threads in map(int, a.threads.split(",")):
        for name, *_ in configs:
            ref = rows[("fp32 dense" if name.startswith("fp32") else "w4g32", threads)]
            r = rows[(name, threads)]
            print(f"{threads} thr  {name:24s} decode {r['decode'] / ref['decode']:.2f}x  "
                  f"prefill {r['prefill'] / ref['prefill']:.2f}x  Linears "
                  f"{r['linear_bytes'] / ref['linear_bytes']:.2f}x")
            if out:
                out.write(json.dumps({"config": name, "threads": threads, **r,
                                      "decode_ratio": r["decode"] / ref["decode"],
                                      "prefill_ratio": r["prefill"] / ref["prefill"]}) + "\n")


if __name__ == "__main__":
    main()
