"""Pruning (magnitude, Wanda, SparseGPT; unstructured and N:M) against the definitions: the
patterns counted, the comparison groups each method uses, SparseGPT's update against the
closed-form OBS update of a single weight, the joint sweep with GPTQ, and the command line."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from cli_helpers import lowbit_cli, one_line_error
from conftest import tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.grids import get_grid
from lowbit.io.native import load_quantized
from lowbit.io.serving import load_checkpoint, write_checkpoint
from lowbit.methods.gptq import GPTQ, gptq_quantize, prepare_hessian
from lowbit.methods.prune import Prune, magnitude, sparsegpt, wanda
from lowbit.methods.rtn import RTN, hessian_loss, rtn
from lowbit.methods.sparsity import Sparsity, select


def correlated_hessian(n: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix * torch.logspace(-1, 1, n)[torch.randperm(
        n, generator=g)]
    return 2 * x.T @ x / tokens


def test_parse_patterns():
    assert Sparsity.parse("0.5") == Sparsity(0.5)
    assert Sparsity.parse("50%") == Sparsity(0.5)
    assert Sparsity.parse("2:4") == Sparsity(0.5, 2, 4)
    assert Sparsity.parse("4:8").ratio == 0.5 and str(Sparsity.parse("4:8")) == "4:8"
    for bad in ["0", "1", "1.5", "4:2", "2:2", "half", "0:4"]:
        with pytest.raises(LowbitError):
            Sparsity.parse(bad)
    with pytest.raises(LowbitError, match="not a multiple"):
        Sparsity.parse("2:4").check(30)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_keeps_the_top_n_of_every_group(pattern):
    sp = Sparsity.parse(pattern)
    s = torch.rand(16, 64)
    keep = select(s, sp)
    groups, kept = s.reshape(16, -1, sp.m), keep.reshape(16, -1, sp.m)
    assert (kept.sum(-1) == sp.n).all()
    # every kept score beats every dropped one of its group
    lo = torch.where(kept, groups, torch.inf).amin(-1)
    hi = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (lo >= hi).all()


def test_magnitude_compares_the_whole_layer_and_wanda_each_row():
    w = torch.randn(8, 64) * torch.linspace(0.1, 2, 8)[:, None]  # rows of different sizes
    sp = Sparsity(0.5)
    km = magnitude(w, sp)
    assert km.sum() == w.numel() // 2
    assert not (km.sum(1) == 32).all()  # small rows lose more than half
    assert w.abs()[km].min() >= w.abs()[~km].max()
    norm = torch.rand(64) + 0.01
    kw = wanda(w, norm, sp)
    assert (kw.sum(1) == 32).all()
    score = w.abs() * norm.sqrt()
    for r in range(8):
        assert score[r][kw[r]].min() >= score[r][~kw[r]].max()
    assert not torch.equal(kw, select(w.abs(), sp, per_row=True))  # the inputs count


def test_sparsegpt_on_a_diagonal_hessian_is_wanda_without_update():
    """With uncorrelated inputs OBS has nothing to compensate with: SparseGPT's choice per N:M
    group is Wanda's (w^2 h_jj) and the kept weights stay as they were."""
    w = torch.randn(12, 32)
    d = torch.rand(32) + 0.1
    hes = prepare_hessian(torch.diag(d), act_order=False, damp=0.0)
    new, keep = sparsegpt(w, hes, Sparsity.parse("2:4"))
    assert torch.equal(keep, wanda(w, d, Sparsity.parse("2:4")))
    torch.testing.assert_close(new, w * keep)


def test_sparsegpt_matches_the_obs_update_of_one_weight():
    """Dropping one weight q of a row, OBS moves the others by -w_q H^-1[q, :] / H^-1[q, q]
    (H damped as prepared): the sweep must give exactly that."""
    n = 8
    h = correlated_hessian(n)
    w = torch.randn(1, n)
    w[0, 0] = 1e-3  # the one to go (its saliency is by far the smallest)
    hes = prepare_hessian(h, act_order=False, damp=0.01)
    new, keep = sparsegpt(w, hes, Sparsity(1 / n))
    assert keep.sum() == n - 1 and not keep[0, 0]
    hd = h.clone()
    hd.diagonal().add_(hes.damp)
    hinv = torch.linalg.inv(hd.double())
    ref = w.double() - w[0, 0].double() * hinv[0] / hinv[0, 0]
    torch.testing.assert_close(new.double(), ref, atol=1e-5, rtol=1e-4)
    assert new[0, 0] == 0


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "4:8"])
def test_sparsegpt_loses_least_of_the_three(pattern):
    sp = Sparsity.parse(pattern)
    h = correlated_hessian(64)
    w = torch.randn(32, 64)
    hes = prepare_hessian(h, act_order=False)
    new, keep = sparsegpt(w, hes, sp)
    assert keep.float().mean() == 0.5 and torch.equal(new == 0, ~keep)
    if sp.nm:
        assert (keep.reshape(32, -1, sp.m).sum(-1) == sp.n).all()
    loss = {"sparsegpt": hessian_loss(new - w, h),
            "sparsegpt mask, no update": hessian_loss(w * keep - w, h),
            "wanda": hessian_loss(w * wanda(w, h.diagonal(), sp) - w, h),
            "magnitude": hessian_loss(w * magnitude(w, sp) - w, h)}
    assert loss["sparsegpt"] < 0.9 * loss["sparsegpt mask, no update"]
    assert loss["sparsegpt"] < loss["wanda"] < loss["magnitude"]


def test_gptq_keeps_a_mask_and_prunes_in_its_own_sweep():
    h = correlated_hessian(64)
    w = torch.randn(16, 64)
    grid = get_grid("w4g32")
    keep = wanda(w, h.diagonal(), Sparsity(0.5))
    for act in (False, True):
        gw = gptq_quantize(w * keep, prepare_hessian(h, act), grid, keep=keep)
        assert torch.equal(gw.dequantize() == 0, ~keep | (gw.dequantize() == 0) & keep)
        assert (gw.dequantize()[~keep] == 0).all()
    joint = gptq_quantize(w, prepare_hessian(h, False), grid, prune=Sparsity.parse("2:4"))
    dq = joint.dequantize()
    assert ((dq != 0).reshape(16, -1, 4).sum(-1) <= 2).all()
    # the sweep compensates what it drops and rounds: far below Wanda's mask + RTN
    j50 = gptq_quantize(w, prepare_hessian(h, False), grid, prune=Sparsity(0.5))
    plain = rtn(w * keep, grid).dequantize()
    assert hessian_loss(j50.dequantize() - w, h) < 0.9 * hessian_loss(plain - w, h)
    with pytest.raises(LowbitError, match="act_order off"):
        gptq_quantize(w, prepare_hessian(h, True), grid, prune=Sparsity.parse("2:4"))


def test_grid_without_an_exact_zero_is_refused():
    h = correlated_hessian(64)
    w = torch.randn(16, 64) + 3.0  # no weight near zero: the 3-bit table has no zero
    keep = magnitude(w, Sparsity(0.5))
    with pytest.raises(LowbitError, match="zero is not on"):
        gptq_quantize(w, prepare_hessian(h, False), get_grid("sq3"), keep=keep)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("rounder", [None, "rtn", "gptq"])
def test_pipeline_prunes_then_rounds(windows, method, rounder):
    m = tiny_model("llama")
    steps = [Prune(method=method, sparsity="2:4")]
    steps += [] if rounder is None else [(RTN if rounder == "rtn" else GPTQ)(scheme="w4g32")]
    res = lowbit.quantize(m, steps, windows, progress=False)
    rows = [r for r in res.rows if "pruner" in r]
    assert len(rows) == 7 * 2 and all(r["pruned"] >= 0.5 for r in rows)
    w = m.model.layers[1].mlp.gate_proj
    dense = w.weight if rounder is None else w.grid_weight().dequantize()
    assert ((dense != 0).reshape(dense.shape[0], -1, 4).sum(-1) <= 2).all()
    assert (rows[0].get("joint") is True) == (method == "sparsegpt" and rounder == "gptq")


def test_plan_refuses_what_cannot_hold_zeros(windows):
    m = tiny_model("llama")
    with pytest.raises(LowbitError, match="hqq cannot keep pruned weights"):
        lowbit.plan(m, [Prune(method="magnitude"), lowbit.recipe.STEPS["hqq"]()])
    with pytest.raises(LowbitError, match="lm_head is not pruned"):
        lowbit.plan(m, [Prune(method="magnitude", ignore=())])
    with pytest.raises(LowbitError, match="must come before"):
        lowbit.plan(m, [GPTQ(), Prune()])
    with pytest.raises(LowbitError, match="unknown method"):
        Prune(method="random")


def test_cli_prune_alone_saves_reloads_and_evaluates(tmp_path, tiny_ckpt):
    ckpt, text = tiny_ckpt
    out = tmp_path / "pruned"
    r = lowbit_cli("quantize", ckpt, "--method", "none", "--prune", "wanda", "--sparsity", "2:4",
                   "--calib", text, "--calib-samples", 8, "--seq-len", 64, "--out", out,
                   "--quiet")
    assert "14 layers pruned (50.0% of their weights zero" in r.out
    info = lowbit_cli("info", out).out
    assert "(full precision)" in info and "recipe: prune wanda 2:4" in info
    model, _ = load_quantized(out)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    base = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).model
    assert not torch.equal(w, base.layers[0].self_attn.q_proj.weight)
    one_line_error(lowbit_cli("quantize", ckpt, "--method", "none", "--prune", "wanda",
                              "--format", "compressed-tensors", "--out", tmp_path / "x",
                              ok=False), "quantizes no Linear")


def test_cli_prune_then_gptq_loads_in_transformers(tmp_path, tiny_ckpt):
    ckpt, text = tiny_ckpt
    out = tmp_path / "sparse-w4"
    r = lowbit_cli("quantize", ckpt, "--prune", "sparsegpt", "--scheme", "w4g32",
                   "--calib", text, "--calib-samples", 8, "--seq-len", 64, "--out", out,
                   "--quiet")
    assert "(compressed-tensors)" in r.out and "50.0% of the weights pruned" in r.out
    ours, _ = load_checkpoint(out)
    w = ours.model.layers[1].mlp.down_proj.grid_weight().dequantize()
    assert float((w == 0).float().mean()) >= 0.5
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--method", "none"], "give --prune"),
    (["--sparsity", "0.5"], "--sparsity goes with --prune"),
    (["--method", "none", "--prune", "wanda", "--scheme", "w4g64"], "drop --scheme"),
    (["--prune", "wanda", "--sparsity", "3:2"], "0 < N < M"),
    (["--prune", "wanda", "--method", "hqq"], "hqq cannot keep pruned weights"),
])
def test_cli_prune_errors(tmp_path, tiny_ckpt, args, message):
    ckpt, _ = tiny_ckpt
    one_line_error(lowbit_cli("quantize", ckpt, *args, "--out", tmp_path / "x", ok=False),
                   message)


def test_write_checkpoint_of_pruned_rtn(tmp_path, windows):
    """The pruned zeros survive the compressed-tensors layout and transformers' loader."""
    m = tiny_model("llama")
    res = lowbit.quantize(m, [Prune(method="magnitude", sparsity="4:8"), RTN(scheme="w4g32")],
                          None, progress=False)
    out = tmp_path / "ct"
    write_checkpoint(out, "compressed-tensors", m, None, res.weights, {}, dtype="float32")
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m(ids).logits, atol=1e-4, rtol=1e-4)
    w = hf.model.layers[0].mlp.up_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 8).sum(-1) <= 4).all()


def test_owl_spreads_the_ratio_by_outlier_share(windows):
    m = tiny_model("llama")
    with torch.no_grad():  # block 1 gets heavy outliers: it must be pruned less
        m.model.layers[1].self_attn.q_proj.weight.view(-1)[::10] *= 20
    step = Prune(method="wanda", sparsity="0.5", owl=True, owl_lambda=0.1)
    res = lowbit.quantize(m, [step], windows, progress=False)
    owl = {r["block"]: r for r in res.rows if "outlier_share" in r}
    assert owl[1]["outlier_share"] > owl[0]["outlier_share"]
    assert owl[1]["sparsity"] == pytest.approx(0.4) and owl[0]["sparsity"] == pytest.approx(0.6)
    pruned = {r["name"]: r["pruned"] for r in res.rows if "pruner" in r}
    assert pruned["model.layers.1.mlp.up_proj"] == pytest.approx(0.4, abs=0.01)
    assert pruned["model.layers.0.mlp.up_proj"] == pytest.approx(0.6, abs=0.01)
    with pytest.raises(LowbitError, match="keeps N of every M"):
        Prune(sparsity="2:4", owl=True)
    with pytest.raises(LowbitError, match="owl_lambda"):
        Prune(sparsity="0.9", owl=True, owl_lambda=0.2)


def test_wanda_needs_no_hessian():
    assert Prune(method="wanda").wants() == frozenset({"sq_sum"})
    assert Prune(method="magnitude").wants() == frozenset()


@pytest.mark.parametrize("family", ["gpt2", "qwen2_moe", "gemma2"])
def test_other_families_prune(family, windows):
    """Conv1D weights (stored transposed), experts (each a Linear, routed statistics)."""
    m = tiny_model(family)
    res = lowbit.quantize(m, [Prune(method="wanda", sparsity="2:4"), GPTQ(scheme="w4g32")],
                          windows, progress=False)
    rows = [r for r in res.rows if "pruner" in r]
    assert rows and all(r["pruned"] == 0.5 for r in rows)
    for name in [r["name"] for r in rows][:6]:
        w = res.weights[name].dequantize()
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all(), name
