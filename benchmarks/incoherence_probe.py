"""Why incoherence processing (random Hadamard on both sides of a weight) loses on SmolLM2:
each Linear's output error with and without it (RTN onto one grid, on the Linear's own inputs
from 2 WikiText-2 windows), and how the plain basis already rounds finely where the inputs are
large.

    python benchmarks/incoherence_probe.py --scheme w3g64

Columns: ``||x (Q(W) - W)^T|| / ||x W^T||`` plain and incoherent (``R_out^T W R_in`` rounded,
then rotated back); the median over output channels of the same ratio; ``alignment`` =
``sum_j mse_j H_jj / (mean(mse) tr H)`` with ``mse_j`` the plain rounding's mean squared error
of column j and ``H_jj`` its input energy (below 1: large inputs meet small, finely rounded
columns, which a rotation evens out); the share of the input energy in the 4 largest input
channels and the rms of those columns against the median column's.
"""

from __future__ import annotations

import argparse

import torch
from quality import WIKI

from lowbit import data
from lowbit.formats.grids import get_grid
from lowbit.formats.hadamard import rotation
from lowbit.methods.rtn import rtn
from lowbit.models import load_model

KINDS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.down_proj")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="w3g64")
    ap.add_argument("--blocks", default="2,5,15,28")
    a = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    win = data.windows(data.tokenize(tok, data.read_text(WIKI)), 2, 512)
    names = [f"model.layers.{b}.{k}" for b in a.blocks.split(",") for k in KINDS]
    xs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(mod, args, out):
            xs[name] = args[0].flatten(0, -2).detach().float()
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(input_ids=win)
    for h in hooks:
        h.remove()
    grid = get_grid(a.scheme)
    print(f"{'layer':34s} {'plain':>7s} {'incoh':>7s} {'ch plain':>8s} {'ch incoh':>8s} "
          f"{'align':>6s} {'top-4 H':>7s} {'their rms':>9s}")
    for n in names:
        w, x = model.get_submodule(n).weight.data.float(), xs[n]
        y = x @ w.T
        r_in, r_out = rotation(w.shape[1], 2)[0].float(), rotation(w.shape[0], 3)[0].float()
        plain = rtn(w, grid).dequantize()
        incoh = r_out @ rtn(r_out.T @ w @ r_in, grid).dequantize() @ r_in.T
        errs = []
        for d in (plain, incoh):
            e = x @ (d - w).T
            errs.append((float(e.norm() / y.norm()),
                         float((e.norm(dim=0) / y.norm(dim=0).clamp_min(1e-9)).median())))
        hd = (x * x).sum(0)
        mse = (plain - w).pow(2).mean(0)
        align = float((mse * hd).sum() / (mse.mean() * hd.sum()))
        top = hd.topk(4).indices
        rms = w.pow(2).mean(0).sqrt()
        share, size = float(hd[top].sum() / hd.sum()), float(rms[top].mean() / rms.median())
        print(f"{n.removeprefix('model.'):34s} {errs[0][0]:7.4f} {errs[1][0]:7.4f} "
              f"{errs[0][1]:8.4f} {errs[1][1]:8.4f} {align:6.3f} {share:7.2f} {size:9.2f}")


if __name__ == "__main__":
    main()
