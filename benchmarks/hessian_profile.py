"""How skewed each Linear's Hessian diagonal is, and what that does to GPTQ's damping.

    python benchmarks/hessian_profile.py [--windows 8] [--calib wiki|self|pydoc]

Collects H = 2 X^T X / n for every Linear input of the unquantized default model (one pass,
no quantization) and prints, per kind of Linear, the median over blocks of: the largest
diagonal entry over the median one, the share of the trace held by the top 1% of input
channels, and lambda / median diag for lambda = 0.01 * mean(diag H), GPTQ's damping. A
lambda far above the typical diagonal makes H + lambda*I nearly a multiple of the identity
for most columns, and GPTQ then rounds those columns almost like RTN.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from quality import WIKI, calibration

from lowbit import data
from lowbit.arch import block_linears, get_blocks, spec_for
from lowbit.models import load_model


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib", default="wiki")
    ap.add_argument("--damp", type=float, default=0.01)
    a = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    spec = spec_for(model)
    ids = data.tokenize(tok, data.read_text(WIKI))
    cal = calibration(a.calib, model, tok, ids, a.windows)
    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    handles = []
    for bi, block in enumerate(get_blocks(model, spec)):
        for name, lin in block_linears(block, spec).items():
            key = f"{bi}.{name}"

            def hook(_m, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                h = hs.setdefault(key, torch.zeros(x.shape[1], x.shape[1]))
                h.addmm_(x.T, x, alpha=2.0)
                counts[key] += x.shape[0]

            handles.append(lin.register_forward_pre_hook(hook))
    for i in range(cal.shape[0]):
        model(input_ids=cal[i : i + 1])
    for h in handles:
        h.remove()

    rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for key, h in hs.items():
        d = torch.diag(h) / counts[key]
        med = float(d.median().clamp(min=1e-12))
        top = max(1, d.numel() // 100)
        share = float(d.topk(top).values.sum() / d.sum())
        lam = a.damp * float(d.mean())
        rows[key.split(".", 1)[1]].append((float(d.max()) / med, share, lam / med))
    print(f"calibration {a.calib} x{a.windows} windows of 512; damping {a.damp} x mean diag")
    print(f"{'linear':<18} {'max/median diag':>16} {'top-1% share':>13} {'lambda/median':>14}")
    for name, vals in rows.items():
        mx, share, lam = (statistics.median(v[i] for v in vals) for i in range(3))
        worst = max(vals, key=lambda v: v[2])[2]
        print(f"{name:<18} {mx:>16.1f} {share:>13.3f} {lam:>14.3f}   (worst block {worst:.2f})")


if __name__ == "__main__":
    main()
