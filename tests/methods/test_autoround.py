"""Block-wise learned rounding: every block's output error ends at or below RTN's, the model
ends closer to the float model than RTN leaves it, the stored weights keep RTN's scales and
move each code by at most one level, and the command line runs it and refuses what it cannot
do."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cli_helpers import lowbit_cli, one_line_error
from conftest import tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.grids import get_grid
from lowbit.methods.autoround import AutoRound
from lowbit.methods.fakequant import level_gaps
from lowbit.methods.rtn import RTN, rtn


def mean_kl(model, ref, ids):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


def test_learned_rounding_beats_rtn_on_every_block_and_on_the_model():
    base = tiny_model("llama")
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.log_softmax(base(input_ids=ids).logits.float(), -1)
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear)}
    kls = {}
    for step in (RTN(scheme="w3g32"), AutoRound(scheme="w3g32", iters=40)):
        model = copy.deepcopy(base)
        res = lowbit.quantize(model, [step], calib, progress=False)
        kls[step.step] = mean_kl(model, ref, ids)
        if step.step != "autoround":
            continue
        rows = [r for r in res.rows if "block_loss" in r]
        assert len(rows) == 14
        assert all(r["block_loss"] <= r["block_loss_rtn"] for r in rows)
        assert sum(r["block_loss"] for r in rows) < 0.8 * sum(r["block_loss_rtn"] for r in rows)
        name = "model.layers.1.mlp.down_proj"
        gw = res.weights[name]
        # the grid's parameters are RTN's fit of the layer's float weight (block 0 changed
        # block 1's inputs, not its weights); each code is a neighbour of RTN's
        near = rtn(weights[name], get_grid("w3g32"))
        torch.testing.assert_close(gw.params["scale"], near.params["scale"], rtol=0, atol=0)
        moved = (gw.codes.int() - near.codes.int()).abs()
        assert int(moved.max()) == 1 and 0 < float((moved > 0).float().mean()) < 0.5
    assert kls["autoround"] < kls["rtn"]


@pytest.mark.parametrize("scheme", ["nf4", "mxfp4", "nvfp4"])
def test_learned_rounding_on_uneven_grids(scheme):
    """NF4, MXFP4, NVFP4: offsets in units of the gap between the levels around each weight;
    every block ends at or below round-to-nearest, and each weight takes one of its two
    neighbouring levels."""
    base = tiny_model("llama")
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj"
    w = base.get_submodule(name).weight.detach().clone()
    res = lowbit.quantize(copy.deepcopy(base), [AutoRound(scheme=scheme, iters=30)], calib,
                          progress=False)
    rows = [r for r in res.rows if "block_loss" in r]
    assert len(rows) == 14 and all(r["block_loss"] <= r["block_loss_rtn"] for r in rows)
    assert sum(r["block_loss"] for r in rows) < sum(r["block_loss_rtn"] for r in rows)
    gw = res.weights[name]
    near = rtn(w, get_grid(scheme))
    changed = gw.codes != near.codes
    assert 0 < float(changed.float().mean()) < 0.5
    # each weight inside the grid's range takes one of the two levels around it: its distance
    # to the stored value is at most the gap between them
    from lowbit.formats.grid_base import grouped_args

    xv, pv = grouped_args(gw.grid, w, gw.params)
    inside = ~gw.grid.saturated(xv, pv).reshape(w.shape)
    gaps = level_gaps(gw.grid, w, gw.params)
    far = (gw.dequantize() - w).abs() > gaps * (1 + 1e-5) + 1e-7
    assert not bool((far & inside).any())


def test_level_gaps_are_the_grids_own_steps():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    g = get_grid("w4g64")
    p = g.fit_all(w)
    cols = torch.arange(128) // 64
    torch.testing.assert_close(level_gaps(g, w, p), p["scale"][:, cols], rtol=0, atol=0)
    nf4 = get_grid("nf4")
    p = nf4.fit_all(w)
    book = nf4.codebook.float()  # a weight between two code book entries: their distance
    x = torch.full((1, 64), float(book[9] * 0.7 + book[10] * 0.3))
    x[0, 0] = 1.0  # the block's absmax, so the scale is 1
    gaps = level_gaps(nf4, x, nf4.fit_all(x))
    torch.testing.assert_close(gaps[0, 1], book[10] - book[9])
    torch.testing.assert_close(gaps[0, 0], book[-1] - book[-2])  # the top: the gap below


def test_autoround_refuses_what_it_cannot_round():
    with pytest.raises(LowbitError, match="256 levels"):
        AutoRound(scheme="fp8-e4m3")
    with pytest.raises(LowbitError, match="iters must be at least 1"):
        AutoRound(iters=0)


def test_autoround_from_the_command_line(tiny_ckpt, tmp_path):
    ckpt, text = tiny_ckpt
    out = tmp_path / "ar"
    lowbit_cli("quantize", ckpt, "--method", "autoround", "--scheme", "w4g32", "--iters", "3",
               "--calib", text, "--calib-samples", "4", "--calib-offset", "2", "--seq-len", "32",
               "--out", out,
               "--quiet")
    step = json.loads((out / "lowbit.json").read_text())["recipe"]["steps"][0]
    assert (step["step"], step["iters"], step["scheme"]) == ("autoround", 3, "w4g32")
    lowbit_cli("eval", out, "--data", text, "--windows", "2", "--seq-len", "32")
    one_line_error(lowbit_cli("quantize", ckpt, "--method", "gptq", "--iters", "3", "--out",
                              tmp_path / "x", ok=False), "--iters is for autoround")
    one_line_error(lowbit_cli("quantize", ckpt, "--method", "autoround", "--scheme", "mxint8",
                              "--out", tmp_path / "y", ok=False), "256 levels")
