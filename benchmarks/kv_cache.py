"""KV-cache formats on the protocol (issue 17): SmolLM2-135M in fp32, WikiText-2 test windows
from token 0, each window's first half prefilled and every later token fed alone, so it reads
the quantized cache (``lowbit.eval.kv``). Per format: perplexity against the full-precision
cache on the same tokens, KL and top-1 against it, cache bytes per token measured from the
stored tensors (at the end of a window, the full-precision residual window included, and per
stored token) beside the fp16 formula, and decode tokens/s beside the fp cache's, measured in
the same run.

    python benchmarks/kv_cache.py --context 2048 --windows 8 --json results/kv.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from quality import WIKI
from transformers import DynamicCache

from lowbit import data
from lowbit.cli.common import format_table
from lowbit.eval.kv import kv_evaluate
from lowbit.formats.kv import parse_kv
from lowbit.jobs import kv_calibration
from lowbit.models import load_model
from lowbit.runtime.kvcache import calibrate_kv

SPECS = ["int8", "fp8", "kivi-k4v4-r128", "pertoken-k4v4-r128-h", "kivi-k2v2-r128",
         "pertoken-k2v2-r128", "kvquant-k2v2-r128", "kivi-k2v2-r128-h",
         "kvquant-k2v2-r128-s1-o1-h", "kvquant-k2v2-r128-s1-o0.5-h"]
COLS = [("context", "ctx", ""), ("kv", "KV cache", ""), ("ppl", "ppl", ".3f"),
        ("ppl_fp_cache", "fp cache", ".3f"), ("ppl_change", "change", "+.2%"),
        ("kld_mean", "KLD", ".4f"), ("same_top_p", "same top", ".3f"),
        ("kv_bytes_per_token", "B/token", ".0f"), ("kv_bytes_ratio_fp16", "x fp16", ".3f"),
        ("stored_ratio_fp16", "stored x fp16", ".3f"), ("decode_tokens_per_s", "tok/s", ".1f"),
        ("speed_vs_fp", "x fp tok/s", ".2f")]


@torch.no_grad()
def fp_cache_speed(model, ids: torch.Tensor, prefill: int) -> float:
    """Decode tokens/s of transformers' full-precision cache over the scored positions, the
    windows ``ids`` decoded together as ``kv_evaluate`` decodes them."""
    cache = DynamicCache()
    model(input_ids=ids[:, :prefill], cache=cache, use_cache=True)
    t0 = time.perf_counter()
    for t in range(prefill, ids.shape[1] - 1):
        model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
    return ids.shape[0] * (ids.shape[1] - 1 - prefill) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, nargs="+", default=[2048])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4, help="windows decoded together")
    ap.add_argument("--json", help="append one JSON line per row to this file")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2-135m", "fp32")
    ids = data.tokenize(tok, data.read_text(WIKI))
    calib = kv_calibration(model, tok)
    rows = []
    for ctx in a.context:
        ev = data.windows(ids, a.windows, ctx)
        fp = fp_cache_speed(model, ev[: a.batch], ctx // 2)
        print(f"context {ctx}: fp cache decode {fp:.1f} tok/s", flush=True)
        for name in a.specs.split(","):
            spec = parse_kv(name)
            scales = calibrate_kv(model, spec, calib) if spec.fp8 else None
            r = kv_evaluate(model, ev, spec, scales, progress=True, batch=a.batch)
            r |= {"context": ctx, "ppl_change": r["ppl"] / r["ppl_fp_cache"] - 1,
                  "fp_cache_tokens_per_s": fp, "speed_vs_fp": r["decode_tokens_per_s"] / fp,
                  "stored_ratio_fp16": (r["kv_stored_bytes_per_token"] or 0)
                  / r["kv_fp16_bytes_per_token"], "threads": torch.get_num_threads()}
            rows.append(r)
            print(format_table([r], COLS).splitlines()[-1], flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print()
    print(format_table(rows, COLS))


if __name__ == "__main__":
    main()
