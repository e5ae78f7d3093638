"""Quantization-aware training by distillation on the protocol, with its training curve.

    python benchmarks/qat.py --scheme w4g64 --tokens 262144 --curve 8 --json out.jsonl

SmolLM2-135M in fp32, trained with ``--method qat`` on the in-domain calibration windows
(WikiText-2 test windows from 100, 128 x 512 unless told otherwise), evaluated on windows
0..63. Every ``tokens / curve`` tokens the perplexity of the model as it trains (the
fake-quantized student) is measured on the first ``--curve-windows`` evaluation windows; at
the end the weights are frozen onto the grid, put into the model as lowbit stores them, and
the model is evaluated on the protocol (perplexity, KL, top-1) against the base model. One
JSON line per curve point and one for the result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from quality import base_logprobs, calibration, evaluate_against

import lowbit
from lowbit import data
from lowbit.eval.metrics import peak_rss_bytes
from lowbit.methods.qat import QAT
from lowbit.models import load_model

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--train", default="weights")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calib", default="wiki")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--curve", type=int, default=8, help="curve points (0: none)")
    ap.add_argument("--curve-windows", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    ids = data.tokenize(tok, data.read_text(WIKI))
    ev = data.windows(ids, a.eval_windows, 512)
    cal = calibration(a.calib, model, tok, ids, a.calib_windows)
    blp = base_logprobs(model, ev)  # the float model's, before it trains
    out = open(a.json, "a") if a.json else None
    kw = {"lr": a.lr} if a.lr is not None else {}
    step = QAT(scheme=a.scheme, tokens=a.tokens, train=a.train, batch=a.batch, **kw)
    run = {"scheme": a.scheme, "tokens": a.tokens, "train": a.train, "lr": step.lr,
           "batch": a.batch, "calib": a.calib, "calib_windows": a.calib_windows}

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(run | row) + "\n")
            out.flush()

    t0 = time.perf_counter()
    n_steps = step.steps_for(512)
    every = max(1, n_steps // a.curve) if a.curve else 0
    curve_ev = ev[: a.curve_windows]

    def monitor(it: int, tokens: int) -> None:
        r = evaluate_against(model, curve_ev, None)
        emit({"curve_step": it, "curve_tokens": tokens, "ppl": r["ppl"],
              "eval_windows": len(curve_ev), "seconds": time.perf_counter() - t0})

    plan = lowbit.plan(model, [step])
    layers = {la.full: la.grid for la in plan.layers.values()}
    learned = step.train_model(model, plan.spec, layers, cal, None, True, monitor, every)
    train_s = time.perf_counter() - t0
    with torch.no_grad():  # the frozen weights, as lowbit stores them
        for full, (gw, _) in learned.items():
            model.get_submodule(full).weight.copy_(gw.dequantize())
    bits = sum(gw.grid.bits_per_weight(*gw.shape) * gw.codes.numel()
               for gw, _ in learned.values()) / sum(gw.codes.numel() for gw, _ in learned.values())
    info = next(iter(learned.values()))[1]
    r = evaluate_against(model, ev, blp)
    emit(r | {"bpw": bits, "train_seconds": train_s, "kl_start": info["kl_start"],
              "kl_end": info["kl_end"], "eval_windows": len(ev),
              "peak_rss_bytes": peak_rss_bytes()})


if __name__ == "__main__":
    main()
