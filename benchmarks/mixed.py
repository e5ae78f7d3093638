"""Mixed precision to a size budget against uniform schemes, on the protocol.

    python benchmarks/mixed.py --targets 3.5 4.25 --method gptq --json out.jsonl

1. Sensitivity: ``lowbit.analyze.measure`` on SmolLM2 at the candidate schemes (default
   w2g64, w3g64, w4g64, w8), on 4 in-domain windows of 128 tokens (WikiText-2 test tokens from
   51200: inside the protocol's calibration windows 100..227), timed. Each candidate is
   rounded with ``--sensitivity-method`` (RTN by default; ``gptq`` rounds it as the rows will,
   with Hessians from the rows' calibration windows).
2. For each target: ``choose`` under the exact byte budget, the recipe written as overrides of
   ``--method`` (GPTQ: act-order, static groups), quantized with the protocol's 128 in-domain
   calibration windows and evaluated on WikiText-2 windows 0..63 against the base.
3. The uniform schemes (``--uniform``, default w3g64 and w4g64) the same way, and the straight
   line between the two neighbouring uniform points at each target's exact bits per weight.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from quality import WIKI, base_logprobs, evaluate_against

import lowbit
from lowbit import data
from lowbit.analyze import budget_bytes, budget_recipe, choose, measure, read_sensitivity, summary
from lowbit.cli.common import format_table
from lowbit.models import load_model
from lowbit.recipe import shorthand

COLS = [("variant", "variant", ""), ("bpw", "bits/w", ".3f"), ("ppl", "ppl", ".3f"),
        ("kl_mean", "KL", ".4f"), ("top1", "top-1", ".3f"), ("line", "uniform line", ".3f"),
        ("seconds", "quant s", ".0f")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[3.5, 4.25])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--schemes", default="w2g64,w3g64,w4g64,w8")
    ap.add_argument("--uniform", default="w3g64,w4g64")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--json", help="append one JSON line per variant")
    ap.add_argument("--sensitivity", help="a measurement to reuse (lowbit analyze --json, or "
                    "--save-sensitivity of an earlier run) instead of measuring")
    ap.add_argument("--save-sensitivity", help="write the measurement here (JSON)")
    ap.add_argument("--uniform-from", help="take the uniform rows from this JSON-lines file of an "
                    "earlier run (same protocol) instead of quantizing them again")
    ap.add_argument("--sensitivity-method", default="rtn",
                    help="the rounder each candidate is measured with (rtn, gptq); other than "
                    "rtn, its Hessians come from the calibration windows the rows use")
    a = ap.parse_args()

    base, tok = load_model("smollm2-135m")
    ids = data.tokenize(tok, data.read_text(WIKI))
    ev = data.windows(ids, a.eval_windows, 512)
    cal = data.windows(ids, a.calib_windows, 512, start=100)
    blp = base_logprobs(base, ev)
    t0 = time.perf_counter()
    if a.sensitivity:
        sens = read_sensitivity(a.sensitivity)
    else:
        sens = measure(base, data.windows(ids, 4, 128, start=400), a.schemes.split(","),
                       method=a.sensitivity_method,
                       calib=None if a.sensitivity_method == "rtn" else cal)
    if a.save_sensitivity:
        Path(a.save_sensitivity).write_text(json.dumps(sens))
    print(f"sensitivity ({sens.get('method', 'rtn')}): {len(sens['layers'])} layers x "
          f"{len(sens['schemes'])} schemes on "
          f"{sens['tokens']} tokens in {time.perf_counter() - t0:.0f} s; Spearman of the Hessian "
          f"proxy with the KL: {json.dumps({k: round(v, 3) for k, v in sens['spearman'].items()})}",
          flush=True)
    rows = []

    def run(name, recipe, extra=None):
        model, _ = load_model("smollm2-135m")
        t = time.perf_counter()
        res = lowbit.quantize(model, recipe, cal, progress=False)
        row = {"variant": name, "bpw": res.bits_per_weight(), "seconds": time.perf_counter() - t,
               **evaluate_against(model, ev, blp), **(extra or {})}
        rows.append(row)
        print(format_table([row], COLS).splitlines()[-1], flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    earlier = {}
    if a.uniform_from:
        for line in Path(a.uniform_from).read_text().splitlines():
            row = json.loads(line)
            earlier[row["variant"]] = row
    for s in a.uniform.split(","):
        name = f"{a.method} {s}"
        if name in earlier:
            rows.append(earlier[name] | {"variant": f"{name} (from {a.uniform_from})"})
            print(format_table([rows[-1]], COLS).splitlines()[-1], flush=True)
        else:
            run(name, shorthand(a.method, s))
    uniform = sorted((r["bpw"], r["ppl"]) for r in rows)
    for target in a.targets:
        choice = choose(sens, budget_bytes(sens, target_bpw=target))
        info = summary(sens, choice)
        recipe = budget_recipe(shorthand(a.method, a.uniform.split(",")[0]), choice)
        line = None
        for (b0, p0), (b1, p1) in zip(uniform, uniform[1:], strict=False):
            if b0 <= info["bits_per_weight"] <= b1:
                line = p0 + (p1 - p0) * (info["bits_per_weight"] - b0) / (b1 - b0)
        run(f"{a.method} mixed {target}", recipe,
            {"line": line, "schemes": info["schemes"], "predicted_kl": info["predicted_kl"]})
    print()
    print(format_table(rows, COLS))


if __name__ == "__main__":
    main()
