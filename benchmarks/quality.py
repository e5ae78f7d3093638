"""Quality of several quantized variants of one model on the protocol, side by side.

    python benchmarks/quality.py rtn:w4g64 gptq:w4g64 gptq:w3g64:act_order=1 \
        --calib wiki --calib-windows 128 --eval-windows 64 --json out.json

Each variant is ``method:scheme[:key=value,...]`` (keys: GPTQConfig fields). The base model's
logits are computed once per window and shared by all variants. Calibration ``wiki`` is the
protocol's in-domain set (WikiText-2 test windows from 100), ``pydoc`` the cross-domain set,
``builtin``/``self`` the product's default; evaluation is always WikiText-2 windows 0..N-1.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import fields
from pathlib import Path

import torch

from lowbit import data
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.api import quantize_model
from lowbit.calib import calib_windows
from lowbit.cli import format_table
from lowbit.eval.metrics import peak_rss_bytes
from lowbit.models import load_model

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
COLS = [("variant", "variant", ""), ("calib", "calib", ""), ("bpw", "bits/w", ".3f"),
        ("ppl", "ppl", ".3f"), ("kl_mean", "KL", ".4f"), ("kl_p99", "KL p99", ".3f"),
        ("top1", "top-1", ".3f"), ("seconds", "quant s", ".0f"), ("below_rtn", "<RTN", "")]


def parse_variant(v: str) -> tuple[str, str, GPTQConfig, dict]:
    parts = v.split(":")
    method, scheme = parts[0], parts[1]
    kw, extra = {}, {}
    names = {f.name: f.type for f in fields(GPTQConfig)}
    if len(parts) > 2:
        for item in parts[2].split(","):
            k, val = item.split("=")
            if k in names:
                kw[k] = type(getattr(GPTQConfig(), k))(float(val))
            else:
                extra[k] = val
    return method, scheme, GPTQConfig(**kw), extra


def calibration(kind: str, model, tok, ids, n: int) -> torch.Tensor:
    if kind == "wiki":
        return data.windows(ids, n, 512, start=100)
    return calib_windows(kind, model, tok, n, 512)[0]


@torch.no_grad()
def evaluate_all(base, variants: dict, windows: torch.Tensor) -> dict[str, dict]:
    acc = {k: {"nll": 0.0, "kl": [], "agree": 0} for k in ["base", *variants]}
    n = 0
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        tgt = ids[:, 1:]
        blp = torch.log_softmax(base(input_ids=ids).logits.float()[:, :-1], -1)
        acc["base"]["nll"] += float(-blp.gather(-1, tgt[..., None]).sum())
        for k, m in variants.items():
            lp = torch.log_softmax(m(input_ids=ids).logits.float()[:, :-1], -1)
            acc[k]["nll"] += float(-lp.gather(-1, tgt[..., None]).sum())
            acc[k]["kl"].append((blp.exp() * (blp - lp)).sum(-1).flatten())
            acc[k]["agree"] += int((blp.argmax(-1) == lp.argmax(-1)).sum())
        n += tgt.numel()
        print(f"  window {i + 1}/{windows.shape[0]}", end="\r", flush=True)
    out = {}
    for k, a in acc.items():
        r = {"ppl": math.exp(a["nll"] / n)}
        if a["kl"]:
            kl = torch.cat(a["kl"]).double()
            r |= {"kl_mean": float(kl.mean()), "kl_p99": float(torch.quantile(kl, 0.99)),
                  "top1": a["agree"] / n}
        out[k] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--calib", default="wiki", help="wiki, pydoc, self, builtin or a file")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--json", help="append one JSON line per variant to this file")
    a = ap.parse_args()

    base, tok = load_model("smollm2-135m")
    ids = data.tokenize(tok, data.read_text(WIKI))
    cal = None
    variants, rows = {}, []
    for v in a.variants:
        method, scheme, cfg, extra = parse_variant(v)
        model, _ = load_model("smollm2-135m")
        if method != "rtn" and cal is None:
            cal = calibration(a.calib, model, tok, ids, a.calib_windows)
        t0 = time.perf_counter()
        res = quantize_model(model, method, scheme, cal if method != "rtn" else None, cfg,
                             progress=False, **extra)
        secs = time.perf_counter() - t0
        losses = [r for r in res.rows if "loss" in r]
        rows.append({"variant": v, "calib": a.calib if method != "rtn" else "-",
                     "bpw": res.bits_per_weight(), "seconds": secs,
                     "below_rtn": f"{sum(r['loss'] < r['rtn_loss'] for r in losses)}/{len(losses)}"
                     if losses else None})
        variants[v] = model
        print(f"quantized {v} in {secs:.0f} s", flush=True)
    ev = data.windows(ids, a.eval_windows, 512)
    res = evaluate_all(base, variants, ev)
    table = [{"variant": "base", "calib": "-", "bpw": 32.0, **res["base"]}]
    for r in rows:
        r.update(res[r["variant"]])
        table.append(r)
    print(format_table(table, COLS))
    print(f"eval windows {a.eval_windows}, calibration {a.calib} x{a.calib_windows}, "
          f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")
    if a.json:
        with open(a.json, "a") as f:
            for r in table:
                f.write(json.dumps(r | {"eval_windows": a.eval_windows,
                                        "calib_windows": a.calib_windows}) + "\n")


if __name__ == "__main__":
    main()
