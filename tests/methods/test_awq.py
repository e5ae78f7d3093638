"""Scale folding keeps the fp32 function; AWQ's scales and clipping, and AWQ in recipes."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.arch import get_blocks, spec_for
from lowbit.errors import LowbitError
from lowbit.formats.grids import get_grid
from lowbit.methods.awq import awq_scales, clip_search
from lowbit.methods.rtn import rtn
from lowbit.pipeline.plan import _Executor


def randomize_norms(model):
    """Non-trivial norm weights and biases, so folding into them is really tested."""
    g = torch.Generator().manual_seed(5)
    for mod in model.modules():
        if "norm" in type(mod).__name__.lower():
            mod.weight.data.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
            if getattr(mod, "bias", None) is not None:
                mod.bias.data.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))


def logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows, use_cache=False).logits


class _Skip(lowbit.RTN):
    """An RTN whose rounding is the identity: the model after AWQ stays full precision."""

    step = "test-identity"

    def round_layers(self, weights, grids, stats):
        out = {}
        for name, w in weights.items():
            gw = rtn(w, grids[name])
            gw.dequantize = lambda w=w.clone(): w  # the model keeps the (scaled) weight as is
            out[name] = (gw, {})
        return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma", "gemma2"])
def test_awq_scales_fold_exactly(family, windows, monkeypatch):
    """Without clipping, AWQ's folded fp32 model computes the original logits (llama-tiny has
    grouped value heads: the v -> o scales are shared by the query heads of a value head)."""
    # the identity rounder's Linears stay as they are (no swap for QLinear at the block's end)
    monkeypatch.setattr(_Executor, "swap", lambda self: self.rounded.clear())
    model = tiny_model(family)
    randomize_norms(model)
    ref = logits(model, windows)
    norm0 = get_blocks(model, spec_for(model))[0].input_layernorm.weight.clone()
    with pytest.warns(UserWarning, match="only 192 calibration tokens"):
        res = lowbit.quantize(model, [lowbit.AWQ(n_grid=20 if family == "llama" else 4,
                                                 search_windows=2, clip=False),
                                      _Skip(scheme="w3g32")], windows, progress=False)
    alphas = [r["alpha"] for r in res.rows if "alpha" in r]
    assert len(alphas) == 4 * 2
    # the first group's scales are folded into the first norm exactly when alpha > 0
    changed = not torch.equal(get_blocks(model, spec_for(model))[0].input_layernorm.weight, norm0)
    assert changed == (alphas[0] > 0)
    assert torch.allclose(logits(model, windows), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,missing", [("phi3", "o_proj"), ("opt", "fc2"),
                                            ("gpt2", "c_proj")])
def test_awq_names_the_missing_mapping(family, missing, windows):
    model = tiny_model(family)
    with pytest.raises(LowbitError, match=missing):
        lowbit.quantize(model, lowbit.shorthand("awq", "w4g32"), windows, progress=False)


def test_awq_scales_protect_salient_channels():
    """The principle, against plain RTN on one Linear: with a few input channels far larger
    than the rest, scaling them up before rounding lowers the output error."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 25
    grid = get_grid("w3g32")
    err_rtn = ((rtn(w, grid).dequantize() - w) @ x.T).pow(2).mean()
    s = awq_scales(x.abs().mean(0), 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), atol=1e-4)
    w_awq = rtn(w * s, grid).dequantize() / s
    err_awq = ((w_awq - w) @ x.T).pow(2).mean()
    assert err_awq < 0.8 * err_rtn


@pytest.mark.parametrize("scheme", ["w3g32", "w3g32-asym", "nf4", "mxfp4"])
def test_clip_search_never_worse_and_shrinks_outlier_groups(scheme):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g)
    w[0, 3] = 20.0  # one huge weight dominates its group's range
    x = torch.randn(256, 64, generator=g)
    grid = get_grid(scheme)
    wc, info = clip_search(w, x, grid)
    gs = grid.group_size or 64

    def err(v):
        """The search's objective: each group's share of the output error, squared, summed."""
        d = rtn(v, grid).dequantize() - w
        return sum(((d[:, c:c + gs] @ x[:, c:c + gs].T) ** 2).sum() for c in range(0, 64, gs))

    assert err(wc) <= err(w) * (1 + 1e-6)
    assert wc.abs().max() <= w.abs().max() and info["clip_frac"] > 0


def _outlier_model():
    """A tiny llama whose first norm amplifies four channels, as trained LLMs' norms do."""
    model = tiny_model("llama")
    for block in model.model.layers:
        block.input_layernorm.weight.data[:4] = 30.0
        block.post_attention_layernorm.weight.data[4:8] = 30.0
    return model


def test_awq_beats_rtn_where_activations_have_outliers(windows):
    """End to end: with salient channels, AWQ + RTN is closer to the base model's logits than
    RTN alone, on windows it did not calibrate on."""
    held_out = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9))
    ref = logits(_outlier_model(), held_out)
    errs = {}
    for method in ("rtn", "awq"):
        model = _outlier_model()
        with pytest.warns(UserWarning) if method == "awq" else nullcontext():
            lowbit.quantize(model, lowbit.shorthand(method, "w3g32"), windows, progress=False)
        errs[method] = float((logits(model, held_out) - ref).pow(2).mean())
    assert errs["awq"] < 0.8 * errs["rtn"], errs


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_end_to_end(method, windows):
    model = tiny_model("llama")
    steps = list(lowbit.shorthand(method, "w4g32").steps)
    steps[0] = lowbit.AWQ(search_windows=1, n_grid=4)
    with pytest.warns(UserWarning, match="calibration tokens"):
        res = lowbit.quantize(model, steps, windows, progress=False)
    assert res.recipe.name == {"awq": "awq+rtn", "awq+gptq": "awq+gptq"}[method]
    assert len(res.weights) == 2 * 7
    assert sum(1 for r in res.rows if r.get("step") == "awq" and "alpha" in r) == 2 * 4
    # the model holds the dequantized weights
    name, qw = next(iter(res.weights.items()))
    assert torch.equal(model.get_submodule(name).dequantized_weight(), qw.dequantize())
    assert torch.isfinite(logits(model, windows)).all()


def test_awq_needs_a_rounder_after_it(windows):
    with pytest.raises(LowbitError, match="select no layer"):
        lowbit.quantize(tiny_model("llama"), [lowbit.AWQ()], windows, progress=False)
    with pytest.raises(LowbitError, match="awq .* must come before"):
        lowbit.quantize(tiny_model("llama"), [lowbit.RTN(), lowbit.AWQ()], windows,
                        progress=False)
