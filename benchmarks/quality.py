"""Quality of several quantized variants of one model on the protocol, side by side.

    python benchmarks/quality.py rtn:w4g64 gptq:w4g64 gptq:w3g64:act_order=1 \
        --calib wiki --calib-windows 128 --eval-windows 64 --json out.json

Each variant is ``method:scheme[:key=value,...]`` (``variants.py``: any step option). The base
model's
logits are computed once per window and shared by all variants. Calibration ``wiki`` is the
protocol's in-domain set (WikiText-2 test windows from 100), ``pydoc`` the cross-domain set,
``builtin``/``self`` the product's default; evaluation is always WikiText-2 windows 0..N-1.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from variants import parse_variant

import lowbit
from lowbit import data
from lowbit.calib import calib_windows
from lowbit.cli.common import format_table
from lowbit.eval.metrics import peak_rss_bytes
from lowbit.models import load_model

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
COLS = [
    ("variant", "variant", ""),
    ("calib", "calib", ""),
    ("bpw", "bits/w", ".3f"),
    ("ppl", "ppl", ".3f"),
    ("kl_mean", "KL", ".4f"),
    ("kl_p99", "KL p99", ".3f"),
    ("top1", "top-1", ".3f"),
    ("seconds", "quant s", ".0f"),
    ("below_rtn", "<RTN", ""),
]


def calibration(kind: str, model, tok, ids, n: int) -> torch.Tensor:
    if kind == "wiki":
        return data.windows(ids, n, 512, start=100)
    return calib_windows(kind, model, tok, n, 512)[0]


@torch.no_grad()
def base_logprobs(base, windows: torch.Tensor) -> list[torch.Tensor]:
    """The base model's log-probabilities per window, kept in memory (fp32) for every variant."""
    out = []
    for i in range(windows.shape[0]):
        out.append(torch.log_softmax(base(input_ids=windows[i : i + 1]).logits.float()[:, :-1], -1))
    return out


@torch.no_grad()
def evaluate_against(model, windows: torch.Tensor, base_lp: list[torch.Tensor] | None) -> dict:
    """Perplexity, and with base log-probs: mean KL(base || model), its p99, top-1."""
    nll, n, agree, kls = 0.0, 0, 0, []
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        tgt = ids[:, 1:]
        lp = torch.log_softmax(model(input_ids=ids).logits.float()[:, :-1], -1)
        nll += float(-lp.gather(-1, tgt[..., None]).sum())
        n += tgt.numel()
        if base_lp is not None:
            blp = base_lp[i]
            kls.append((blp.exp() * (blp - lp)).sum(-1).flatten())
            agree += int((blp.argmax(-1) == lp.argmax(-1)).sum())
    r = {"ppl": math.exp(nll / n)}
    if kls:
        kl = torch.cat(kls).double()
        r |= {
            "kl_mean": float(kl.mean()),
            "kl_p99": float(torch.quantile(kl, 0.99)),
            "top1": agree / n,
        }
    return r


def evaluate_all(base, variants: dict, windows: torch.Tensor) -> dict[str, dict]:
    """Every variant against one base pass (kept for benchmarks that batch variants)."""
    blp = base_logprobs(base, windows)
    out = {"base": evaluate_against(base, windows, None)}
    for k, m in variants.items():
        out[k] = evaluate_against(m, windows, blp)
    return out


@torch.no_grad()
def forward_seconds(model, windows: torch.Tensor, chunk: int = 8) -> float:
    """Wall time of one plain forward pass (with the LM head) over the windows."""
    t0 = time.perf_counter()
    for i in range(0, windows.shape[0], chunk):
        model(input_ids=windows[i : i + chunk], use_cache=False)
    return time.perf_counter() - t0


def variant_parser() -> argparse.ArgumentParser:
    """The options of a script that runs ``run_variants`` on the protocol."""
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--json", help="append one JSON line per row to this file")
    return ap


def protocol(eval_windows: int = 64):
    """(base model, tokenizer, WikiText ids, evaluation windows, the base's log-probabilities,
    the table with its base row)."""
    base, tok = load_model("smollm2-135m")
    ids = data.tokenize(tok, data.read_text(WIKI))
    ev = data.windows(ids, eval_windows, 512)
    blp = base_logprobs(base, ev)
    rows = [{"variant": "base", "calib": "-", "bpw": 32.0, **evaluate_against(base, ev, None)}]
    return base, tok, ids, ev, blp, rows


def pruned_bits(res) -> dict:
    """For a pruned model: the share of block-Linear weights pruned and the bits per weight a
    compact store would spend (kept codes, the grid's parameters, a 1-bit mask per weight;
    Linears pruned alone counted as fp16 values)."""
    rows = [r for r in res.rows if "pruner" in r]
    if not rows:  # nothing pruned by weight; nothing quantized: a (smaller) fp16 model
        return {} if len(res.weights) else {"bpw": 16.0}
    n = bits = dropped = 0.0
    for r in rows:
        numel = r["shape"][0] * r["shape"][1]
        gw = res.weights.modules().get(r["name"])
        dense, code = (gw.bits_per_weight(), gw.grid.code_bits) if gw is not None else (16, 16)
        bits += numel * (dense - r["pruned"] * code + 1)
        dropped += numel * r["pruned"]
        n += numel
    out = {"pruned": dropped / n, "bpw_mask": bits / n}
    return out if len(res.weights) else out | {"bpw": 16.0}  # pruned alone: fp16 storage


def run_variants(variants: list[str], table: list[dict], tok, ids, ev, blp, calib: str,
                 n_calib: int, json_path: str | None, save_dir: str | None = None,
                 time_forward: bool = False) -> None:
    """Quantize the model once per variant (``variants.py``'s names), calibrated on ``calib`` x
    ``n_calib`` windows when the recipe needs data, and evaluate it on ``ev`` against the base
    log-probabilities ``blp``: one row each, appended to ``table``, printed, and appended to
    ``json_path`` as one JSON line."""
    out = open(json_path, "a") if json_path else None
    cal = None
    for v in variants:
        recipe = parse_variant(v)
        model, _ = load_model("smollm2-135m")
        needs = lowbit.plan(model, recipe).needs_data
        if needs and cal is None:
            cal = calibration(calib, model, tok, ids, n_calib)
            if time_forward:
                fwd = forward_seconds(model, cal)
                print(f"plain forward over the calibration windows: {fwd:.1f} s", flush=True)
        t0 = time.perf_counter()
        res = lowbit.quantize(model, recipe, cal if needs else None, progress=False)
        secs = time.perf_counter() - t0
        if save_dir:
            lowbit.save(Path(save_dir) / v.replace(":", "_"), model, tok, res,
                        overwrite=True)
        losses = [r for r in res.rows if "loss" in r]
        row = {
            "variant": v,
            "calib": calib if needs else "-",
            "bpw": res.bits_per_weight(),
            "seconds": secs,
            "below_rtn": f"{sum(r['loss'] < r['rtn_loss'] for r in losses)}/{len(losses)}"
            if losses
            else None,
            **evaluate_against(model, ev, blp),
        }
        row |= pruned_bits(res)
        table.append(row)
        print(format_table([row], COLS).splitlines()[-1], flush=True)
        if out:
            out.write(json.dumps(row | {"eval_windows": len(ev), "calib_windows": n_calib})
                      + "\n")
            out.flush()
        del model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--calib", default="wiki", help="wiki, pydoc, self, builtin or a file")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--json", help="append one JSON line per variant to this file")
    ap.add_argument("--save-dir", help="also save each quantized variant (native) under this "
                    "folder, one subfolder per variant")
    ap.add_argument(
        "--time-forward",
        action="store_true",
        help="also time one plain forward pass over the calibration windows",
    )
    a = ap.parse_args()

    base, tok = load_model("smollm2-135m")
    ids = data.tokenize(tok, data.read_text(WIKI))
    ev = data.windows(ids, a.eval_windows, 512)
    t0 = time.perf_counter()
    blp = base_logprobs(base, ev)
    table = [
        {
            "variant": "base",
            "calib": "-",
            "bpw": 32.0,
            **evaluate_against(base, ev, None),
            "seconds": time.perf_counter() - t0,
        }
    ]
    print(format_table(table, COLS), flush=True)
    run_variants(a.variants, table, tok, ids, ev, blp, a.calib, a.calib_windows, a.json,
                 a.save_dir, a.time_forward)
    print()
    print(format_table(table, COLS))
    print(
        f"eval windows {a.eval_windows}, calibration {a.calib} x{a.calib_windows}, "
        f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
