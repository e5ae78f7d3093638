"""HQQ with integer zero points (``lowbit.methods.hqq_math``) against RTN, on the protocol.

    python benchmarks/hqq_probe.py --windows 16 --threads 2 rtn hqq hqq:lp_norm=0.7

Every decoder-block Linear of SmolLM2-135M is replaced by its dequantized weight (groups of
64 along the input dimension); perplexity on the first N WikiText-2 test windows of 512
tokens. Each variant is ``name[:key=value,...]``; ``name`` is ``rtn`` (min-max), ``mse``
(``fit_qparams`` clip search), ``hqq`` (``hqq_fit``; keys are its keyword arguments) or
``ref`` (an emulation of the hqq package: float fp16 zero, min-max scale, zero-only HQQ with
its global early stop). ``--bits`` / ``--sym`` choose the grid; ``--windows 0`` prints only
the weight-level errors. Columns: weight MSE and mean |e|^0.7 relative to RTN's, fit seconds
for all Linears, perplexity.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit import data
from lowbit.arch import block_linears, get_blocks, spec_for
from lowbit.eval.metrics import evaluate
from lowbit.formats.integer import IntGrid, fake_quantize, fit_qparams
from lowbit.methods.hqq_math import hqq_fit, shrink_lp
from lowbit.models import load_model

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def parse(v: str) -> tuple[str, dict]:
    name, _, rest = v.partition(":")
    kw: dict = {}
    for item in filter(None, rest.split(",")):
        k, val = item.split("=")
        if val in ("true", "false"):
            kw[k] = val == "true"
        else:
            try:
                kw[k] = int(val) if val.isdigit() else float(val)
            except ValueError:
                kw[k] = val
    return name, kw


def hqq_package_ref(w: torch.Tensor, bits: int, iters: int = 20) -> torch.Tensor:
    """The hqq package's legacy fit (fp32): min-max of each row without forcing 0 in range,
    a float zero optimised alone, a global mean-|e| early stop; fp16 scale and zero."""
    qmax = (1 << bits) - 1
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    inv = (qmax / (hi - lo)).clamp(max=2e4)  # the package works with 1 / scale
    z = -lo * inv
    beta, best = 10.0, float("inf")
    for _ in range(iters):
        q = torch.round(w * inv + z).clamp(0, qmax)
        r = w - (q - z) / inv
        e = shrink_lp(r, beta, 0.7)
        z = torch.mean(q - (w - e) * inv, 1, keepdim=True)
        beta *= 1.01
        cur = float(r.abs().mean())
        if cur < best:
            best = cur
        else:
            break
    s16, z16 = (1.0 / inv).half().float(), z.half().float()
    q = torch.round(w * inv + z).clamp(0, qmax)
    return (q - z16) * s16


def fit_weight(name: str, kw: dict, w: torch.Tensor, bits: int, sym: bool, group: int):
    """The dequantized (out, in) weight ``w`` under one variant."""
    if name == "ref":
        kw = dict(kw)
        if kw.pop("axis", 1) == 0:  # the package's axis=0: groups of `group` strided elements
            return hqq_package_ref(w.reshape(group, -1).T, bits, **kw).T.reshape(w.shape)
        return hqq_package_ref(w.reshape(-1, group), bits, **kw).reshape(w.shape)
    g = w.reshape(-1, group)
    if name in ("rtn", "mse"):
        grid = IntGrid(bits=bits, group=group, symmetric=sym,
                       clip="minmax" if name == "rtn" else "mse")
        s, z = fit_qparams(g, grid, **kw)
    elif name == "hqq":
        kw = dict(kw)
        wpow = kw.pop("wpow", None)  # weight the error by |w|^wpow (data-free importance)
        if "scan" in kw:  # scan=low/high/steps
            lo_, hi_, n_ = str(kw["scan"]).split("/")
            kw["scan"] = (float(lo_), float(hi_), int(n_))
        weight = None if wpow is None else g.abs().pow(wpow)
        f = hqq_fit(g, bits, symmetric=sym, weight=weight, **kw)
        s, z = f.scale, f.zero
    else:
        raise SystemExit(f"unknown variant {name!r}")
    assert torch.equal(z, z.round()) and float(z.min()) >= 0 and float(z.max()) < 2**bits
    assert torch.equal(s, s.half().float())
    return fake_quantize(g, s, z, bits).reshape(w.shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jsonl", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2-135m")
    spec = spec_for(model)
    mods = [m for b in get_blocks(model, spec) for m in block_linears(b, spec).values()]
    orig = [m.weight.data.clone() for m in mods]
    win = None
    if a.windows:
        win = data.windows(data.tokenize(tok, data.read_text(WIKI)), a.windows, 512, 0)
    rows, base = [], None
    for v in a.variants:
        name, kw = parse(v)
        t0 = time.perf_counter()
        deq = [fit_weight(name, kw, w, a.bits, a.sym, a.group) for w in orig]
        secs = time.perf_counter() - t0
        mse = sum(float(((d - w) ** 2).sum()) for d, w in zip(deq, orig, strict=True))
        lp = sum(float((d - w).abs().pow(0.7).sum()) for d, w in zip(deq, orig, strict=True))
        if base is None:
            base = (mse, lp)
        row = {"variant": v, "bits": a.bits, "sym": a.sym, "mse_rel": mse / base[0],
               "lp_rel": lp / base[1], "seconds": secs, "windows": a.windows}
        if win is not None:
            for m, d in zip(mods, deq, strict=True):
                m.weight.data.copy_(d)
            row["ppl"] = evaluate(model, win, progress=False)["ppl"]
            for m, w in zip(mods, orig, strict=True):
                m.weight.data.copy_(w)
        rows.append(row)
        ppl = f"{row['ppl']:8.3f}" if "ppl" in row else "       -"
        print(f"{v:50s} mse {row['mse_rel']:.4f} lp {row['lp_rel']:.4f} ppl {ppl} "
              f"{secs:6.1f} s", flush=True)
        if a.jsonl:
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    print()
    print("| variant | ppl | weight MSE / first | fit s |")
    print("|---|---|---|---|")
    for r in rows:
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else "-"
        print(f"| {r['variant']} | {ppl} | {r['mse_rel']:.4f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
