"""Mixture-of-experts models: experts split into one Linear each, statistics from the tokens
routed to each expert, the fallback for rarely routed experts, save and reload."""

import pytest
import torch
from conftest import MOE_FAMILIES, tiny_model
from driver_helpers import Visitor, last_block_output

import lowbit
from lowbit.arch import block_groups, get_blocks, spec_for
from lowbit.errors import LowbitError
from lowbit.models import load_model
from lowbit.pipeline.driver import run_sequential
from lowbit.pipeline.plan import execute
from lowbit.pipeline.stats import InputStats
from lowbit.runtime.experts import LinearExperts, unfuse_experts

MOE = sorted(MOE_FAMILIES)
GPTQ = {"steps": [{"step": "gptq", "scheme": "w4g32"}]}


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("family", MOE)
def test_unfused_experts_compute_the_fused_model(family, windows):
    model = tiny_model(family)
    ref = logits(model, windows)
    assert unfuse_experts(model) == 2 and unfuse_experts(model) == 0
    assert isinstance(model.model.layers[1].mlp.experts, LinearExperts)
    assert torch.equal(logits(model, windows), ref)


def test_layers_are_named_per_expert_and_routers_stay_float():
    rtn = {"steps": [{"step": "rtn", "scheme": "w4g32"}]}
    names = {f: set(lowbit.plan(tiny_model(f), rtn).layers) for f in MOE}
    assert {"model.layers.0.mlp.experts.3.w1", "model.layers.1.mlp.experts.0.w2"} \
        <= names["mixtral"]
    for f in ("qwen2_moe", "qwen3_moe"):
        assert "model.layers.1.mlp.experts.2.down_proj" in names[f]
        assert len(names[f]) == 2 * (4 + 4 * 3 + (3 if f == "qwen2_moe" else 0))
    assert "model.layers.0.mlp.shared_expert.up_proj" in names["qwen2_moe"]
    assert not any(n.endswith((".gate", "shared_expert_gate")) for ns in names.values() for n in ns)


def _routed_counts(model, x) -> dict[tuple[int, int], int]:
    """(block, expert) -> tokens the router sends there, from the unquantized model."""
    counts: dict[tuple[int, int], int] = {}

    def count(i, out):
        for e in out[2].flatten().tolist():
            counts[i, e] = counts.get((i, e), 0) + 1

    handles = [b.mlp.gate.register_forward_hook(lambda _m, _a, out, i=i: count(i, out))
               for i, b in enumerate(model.model.layers)]
    logits(model, x)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("family", MOE)
def test_expert_statistics_come_from_the_routed_tokens(family, windows):
    """With quantization off: each expert group's statistics count exactly the tokens routed
    to it, its Hessian is the one of its inputs in a plain forward, and the blocks' outputs are
    the model's."""
    model = tiny_model(family)
    counts = _routed_counts(model, windows)
    ref = last_block_output(model, windows)
    unfuse_experts(model)
    hooked: dict[str, list] = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: hooked.setdefault(n, []).append(
        a[0].reshape(-1, a[0].shape[-1]))) for n, m in model.named_modules() if ".experts." in n]
    logits(model, windows)
    for h in handles:
        h.remove()
    seen = {}

    def grab(ctx, group, st):
        seen[ctx.full(group[0])] = st

    out = run_sequential(model, spec_for(model), windows, Visitor(grab), chunk=2,
                         progress=False, moe_min_tokens=0.0)
    assert torch.allclose(torch.cat(out.hidden), ref, atol=1e-5, rtol=1e-4)
    spec = spec_for(model)
    n_groups = sum(len(block_groups(b, spec)) for b in get_blocks(model, spec))
    assert len(seen) == n_groups
    for (bi, e), n in counts.items():
        g = spec.moe.proj[0]
        st = seen[f"model.layers.{bi}.mlp.experts.{e}.{g}"]
        assert st.n == n and st.info == {"expert": e, "tokens": n, "hessian": "own"}
        x = torch.cat(hooked[f"model.layers.{bi}.mlp.experts.{e}.{g}"])
        assert torch.allclose(st.h, 2 * x.T @ x / n, atol=1e-4, rtol=1e-4)
    assert sum(counts.values()) == 2 * windows.numel() * 2  # 2 blocks, top-2


def _never_route(block, expert: int):
    """A router hook that keeps ``expert`` out of every token's top-k."""
    def hook(mod, _args, out):
        logits_, _, _ = out
        probs = torch.softmax(logits_.float(), -1)
        probs[:, expert] = -1
        top, idx = torch.topk(probs, mod.top_k, -1)
        return logits_, top / top.sum(-1, keepdim=True), idx
    return block.mlp.gate.register_forward_hook(hook)


def test_rarely_routed_experts_are_topped_up_with_all_tokens(windows):
    """Below ``moe_min_tokens`` x in_features routed tokens an expert's Hessian is blended with
    the expert's on every token reaching the block (pooled when it got none); above, its own."""
    model = tiny_model("qwen3_moe")
    unfuse_experts(model)
    block = model.model.layers[0]
    _never_route(block, 2)
    block_in: list = []
    block.mlp.gate.register_forward_pre_hook(lambda _m, a: block_in.append(a[0]))
    seen = {}

    def grab(ctx, group, st):
        if ctx.index == 0:
            seen[group[0]] = st

    run_sequential(model, spec_for(model), windows, Visitor(grab), chunk=3, progress=False,
                   moe_min_tokens=1.5)
    x = torch.cat(block_in[-2:])  # the driver's collecting pass (chunks of 3)
    h_all = 2 * x.T @ x / x.shape[0]
    need = 96  # 1.5 x 64 inputs
    pooled = seen["mlp.experts.2.gate_proj"]
    assert pooled.info["hessian"] == "pooled" and pooled.info["tokens"] == 0
    assert torch.allclose(pooled.h, h_all, atol=1e-4, rtol=1e-4)
    for e in (0, 1, 3):
        st = seen[f"mlp.experts.{e}.gate_proj"]
        n = st.info["tokens"]
        assert n > 0 and st.info["hessian"] == ("own" if n >= need else "blend")
        if n < need:
            assert st.info["prior_share"] == pytest.approx(1 - n / need, abs=1e-4)
    down = seen["mlp.experts.2.down_proj"]  # its prior: the expert run on every token
    e2 = block.mlp.experts[2]
    with torch.no_grad():
        d = e2.inner(x)
    assert down.info["hessian"] == "pooled"
    assert torch.allclose(down.h, 2 * d.T @ d / d.shape[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", MOE)
def test_gptq_rows_saved_and_reloaded_logits(family, windows, tmp_path, capsys):
    model = tiny_model(family)
    res = lowbit.quantize(model, GPTQ, windows, progress=False)
    q = logits(model, windows)
    proj = spec_for(model).moe.proj
    rows = {r["name"]: r for r in res.rows}
    r = rows[f"model.layers.1.mlp.experts.3.{proj[1]}"]
    assert r["expert"] == 3 and 0 <= r["tokens"] < 128 and r["hessian"] in ("blend", "pooled")
    assert r["loss"] <= r["rtn_loss"] * 1.5
    assert "expert groups were routed fewer" in capsys.readouterr().err
    assert not any(".gate" == n[-5:] or "shared_expert_gate" in n for n in res.weights)
    if family == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.down_proj" in res.weights
        assert rows["model.layers.0.mlp.shared_expert.gate_proj"]["tokens"] == windows.numel()
    lowbit.save(tmp_path / "q", model, None, res)
    back, _ = load_model(tmp_path / "q")
    assert torch.equal(logits(back, windows), q)


def test_own_statistics_when_enough_tokens(windows):
    model = tiny_model("mixtral")
    p = lowbit.plan(model, GPTQ)
    res = execute(model, p, windows, progress=False, moe_min_tokens=0.5)
    hs = [r["hessian"] for r in res.rows if "expert" in r]
    assert len(hs) == 2 * 4 * 3 and set(hs) == {"own"}


def test_rtn_without_calibration(windows):
    model = tiny_model("qwen2_moe")
    res = lowbit.quantize(model, {"steps": [{"step": "rtn", "scheme": "w4g32"}]}, progress=False)
    assert len(res.weights) == 2 * (4 + 12 + 3)
    w = model.model.layers[0].mlp.experts[1].down_proj.dequantized_weight()  # a QLinear now
    assert torch.equal(res.weights["model.layers.0.mlp.experts.1.down_proj"].dequantize(), w)


def test_transforms_refuse_moe(windows):
    with pytest.raises(LowbitError, match="awq does not support mixture-of-experts"):
        lowbit.plan(tiny_model("mixtral"), {"steps": [{"step": "awq"},
                                                      {"step": "rtn", "scheme": "w4g32"}]})


def test_blend_is_own_above_the_threshold():
    a, b = InputStats(4, {"hessian"}), InputStats(4, {"hessian"})
    a.add(torch.randn(10, 4))
    b.add(torch.randn(50, 4))
    from lowbit.pipeline.stats import blend

    assert blend(a, b, 10) is a
    m = blend(a, b, 40)
    assert torch.allclose(m.h, 0.25 * a.h + 0.75 * b.h) and m.n == 40
