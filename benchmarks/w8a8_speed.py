"""Prefill speed of W8A8Linear against the fp32 Linear on the default model's shapes.

    python benchmarks/w8a8_speed.py --json benchmarks/results/w8a8_speed.jsonl

For each Linear shape of SmolLM2-135M (q/o 576->576, k/v 576->192, gate/up 576->1536, down
1536->576) and each batch x sequence (1x512, 8x512): median wall time over repeats of the
fp32 ``F.linear``, of ``W8A8Linear`` with dynamic per-token activations on each int8 kernel
(oneDNN needs weight codes within +-64: 7-bit weights; torch._int_mm takes any int8), and of the
int8 GEMM alone. Timings interleave the variants so a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lowbit.runtime.w8a8 import W8A8Linear

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (576, 192),
          "gate_proj/up_proj": (576, 1536), "down_proj": (1536, 576)}
# how many of each shape one block holds (q, k, v, o, gate, up, down)
COUNT = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}


def timed(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--int-mm", action="store_true", help="also time torch._int_mm (slow)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for bs in (1, 8):
        tot = {"fp32": 0.0, "onednn": 0.0}
        for name, (k, n) in SHAPES.items():
            w, x = torch.randn(n, k) * 0.05, torch.randn(bs, 512, k)
            fast = W8A8Linear.from_linear(w, weight_qmax=64, kernel="onednn")
            variants = {"fp32": lambda w=w, x=x: F.linear(x, w), "onednn": lambda m=fast, x=x: m(x)}
            if a.int_mm:
                ref = W8A8Linear.from_linear(w, weight_qmax=127, kernel="int_mm")
                variants["int_mm"] = lambda m=ref, x=x: m(x)
            t = {}
            for _round in range(2):  # interleave
                for v, f in variants.items():
                    t[v] = min(t.get(v, float("inf")), timed(f, a.reps))
            row = {"shape": name, "in": k, "out": n, "batch": bs, "seq": 512,
                   **{f"{v}_ms": round(s * 1e3, 3) for v, s in t.items()},
                   "speedup_onednn": t["fp32"] / t["onednn"], "threads": torch.get_num_threads()}
            rows.append(row)
            for v in tot:
                tot[v] += COUNT[name] * t[v]
            print(json.dumps(row), flush=True)
        block = {"shape": "block (7 Linears)", "batch": bs, "seq": 512,
                 "fp32_ms": round(tot["fp32"] * 1e3, 3), "onednn_ms": round(tot["onednn"] * 1e3, 3),
                 "speedup_onednn": tot["fp32"] / tot["onednn"], "threads": torch.get_num_threads()}
        rows.append(block)
        print(json.dumps(block), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
