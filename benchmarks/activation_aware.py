"""Protocol quality of the activation-aware methods (issue 3): AWQ, AWQ+GPTQ, SmoothQuant W8A8,
naive W8A8 and LLM.int8(), one JSON line per variant.

    python benchmarks/activation_aware.py smoothquant:w8a8:kernel=emulate llm-int8:- \
        awq:w4g64 awq+gptq:w3g64 --eval-windows 64 --calib-windows 128 \
        --json benchmarks/results/activation_aware.jsonl

A variant is ``method:scheme[:key=value,...]`` with keys ``alpha``, ``threshold``, ``kernel``
(int8 methods) or ``search_windows``, ``n_grid``, ``clip`` (AWQ). Calibration: the protocol's
in-domain WikiText-2 windows from 100; evaluation: windows 0..N-1, against the base's logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import COLS, WIKI, base_logprobs, evaluate_against  # noqa: E402
from variants import parse_variant  # noqa: E402

import lowbit  # noqa: E402
from lowbit import data  # noqa: E402
from lowbit.cli.common import format_table  # noqa: E402
from lowbit.eval.metrics import peak_rss_bytes  # noqa: E402
from lowbit.models import load_model  # noqa: E402
from lowbit.runtime.int8_mixed import Int8MixedLinear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--json", help="append one JSON line per variant to this file")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    base, tok = load_model("smollm2-135m")
    ids = data.tokenize(tok, data.read_text(WIKI))
    ev = data.windows(ids, a.eval_windows, 512)
    cal = data.windows(ids, a.calib_windows, 512, start=100)
    blp = base_logprobs(base, ev)
    table = [{"variant": "base", "calib": "-", "bpw": 32.0, **evaluate_against(base, ev, None)}]
    print(format_table(table, COLS), flush=True)
    out = open(a.json, "a") if a.json else None
    for v in a.variants:
        recipe = parse_variant(v)
        model, _ = load_model("smollm2-135m")
        needs = lowbit.plan(model, recipe).needs_data
        t0 = time.perf_counter()
        res = lowbit.quantize(model, recipe, cal if needs else None, progress=False)
        secs = time.perf_counter() - t0
        t1 = time.perf_counter()
        row = {"variant": v, "calib": "wiki" if needs else "-", "bpw": res.bits_per_weight(),
               "seconds": secs, **evaluate_against(model, ev, blp),
               "eval_seconds": time.perf_counter() - t1}
        fr = {n: m.outlier_fraction for n, m in model.named_modules()
              if isinstance(m, Int8MixedLinear)}
        if fr:
            row["outlier_frac_mean"] = sum(fr.values()) / len(fr)
            row["outlier_frac_max"] = max(fr.values())
            row["outlier_frac"] = {k: round(f, 5) for k, f in fr.items()}
        awq_rows = [r for r in res.rows if "alpha" in r]
        if awq_rows:
            row["awq_alpha_mean"] = sum(r["alpha"] for r in awq_rows) / len(awq_rows)
        table.append(row)
        print(format_table([row], COLS).splitlines()[-1], f"(eval {row['eval_seconds']:.0f} s)",
              flush=True)
        if out:
            out.write(json.dumps(row | {"eval_windows": a.eval_windows,
                                        "calib_windows": a.calib_windows,
                                        "threads": torch.get_num_threads()}) + "\n")
            out.flush()
        del model
    print()
    print(format_table(table, COLS))
    print(f"eval windows {a.eval_windows}, calibration wiki x{a.calib_windows}, "
          f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
