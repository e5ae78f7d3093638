"""Scale folding keeps the fp32 function; AWQ's scales, clipping and end-to-end methods."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.api import quantize_model
from lowbit.arch import get_blocks, spec_for
from lowbit.errors import LowbitError
from lowbit.methods.awq import awq_scales, awq_transform, clip_search
from lowbit.methods.int8_methods import smooth_model
from lowbit.pipeline.act_stats import collect_act_stats
from lowbit.scheme import parse_scheme


def _randomize_norms(model):
    """Non-trivial norm weights and biases, so folding into them is really tested."""
    g = torch.Generator().manual_seed(5)
    for mod in model.modules():
        if "norm" in type(mod).__name__.lower():
            mod.weight.data.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
            if getattr(mod, "bias", None) is not None:
                mod.bias.data.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))


def _logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt2"])
def test_smoothing_folds_exactly(family, windows):
    model = tiny_model(family)
    _randomize_norms(model)
    spec = spec_for(model)
    with pytest.warns(UserWarning, match="192 calibration tokens"):
        stats = collect_act_stats(model, spec, windows, progress=False)
    ref = _logits(model, windows)
    applied = smooth_model(model, spec, stats, alpha=0.5)
    assert applied and any((s - 1).abs().max() > 0.05 for s in applied.values())
    assert torch.allclose(_logits(model, windows), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma", "gemma2"])
def test_awq_scales_fold_exactly(family, windows):
    """Without clipping, AWQ's folded fp32 model computes the original logits (llama-tiny has
    grouped value heads: the v -> o scales are shared by the query heads of a value head)."""
    model = tiny_model(family)
    _randomize_norms(model)
    ref = _logits(model, windows)
    norm0 = get_blocks(model, spec_for(model))[0].input_layernorm.weight.clone()
    with pytest.warns(UserWarning, match="only 192 calibration tokens"):
        rows = awq_transform(model, spec_for(model), windows, parse_scheme("w3g32"),
                             n_grid=20 if family == "llama" else 4,
                             search_windows=2, clip=False, progress=False)
    alphas = [r["alpha"] for r in rows if "alpha" in r]
    assert len(alphas) == 4 * 2 and len({r["alpha"] for r in rows if "alpha" in r}) >= 1
    assert all(r["block_loss"] <= r["block_loss_alpha0"] for r in rows if "alpha" in r)
    if any(a > 0 for a in alphas[:1]):
        assert not torch.equal(get_blocks(model, spec_for(model))[0].input_layernorm.weight, norm0)
    assert torch.allclose(_logits(model, windows), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,missing", [("phi3", "o_proj"), ("opt", "fc2"),
                                            ("gpt2", "c_proj")])
def test_awq_names_the_missing_mapping(family, missing, windows):
    model = tiny_model(family)
    with pytest.raises(LowbitError, match=missing):
        quantize_model(model, "awq", "w4g32", windows, progress=False)


def test_awq_scales_protect_salient_channels():
    """The principle, against plain RTN on one Linear: with a few input channels far larger
    than the rest, scaling them up before rounding lowers the output error."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 25
    sch = parse_scheme("w3g32")
    err_rtn = ((rtn_quantize(w, sch).dequantize() - w) @ x.T).pow(2).mean()
    s = awq_scales(x.abs().mean(0), 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), atol=1e-4)
    w_awq = rtn_quantize(w * s, sch).dequantize() / s
    err_awq = ((w_awq - w) @ x.T).pow(2).mean()
    assert err_awq < 0.8 * err_rtn


def test_clip_search_never_worse_and_shrinks_outlier_groups():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g)
    w[0, 3] = 20.0  # one huge weight dominates its group's range
    x = torch.randn(256, 64, generator=g)
    sch = parse_scheme("w3g32")
    wc, info = clip_search(w, x, sch)
    err = lambda v: ((rtn_quantize(v, sch).dequantize() - w) @ x.T).pow(2).sum()  # noqa: E731
    assert err(wc) <= err(w) + 1e-3
    assert wc.abs().max() <= w.abs().max() and info["clip_frac"] > 0


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_end_to_end(method, windows):
    model = tiny_model("llama")
    res = quantize_model(model, method, "w4g32", windows, progress=False,
                         awq={"search_windows": 1, "n_grid": 4})
    assert res.method == method and len(res.qweights) == 2 * 7
    assert any(r.get("awq") for r in res.rows)
    # the model holds the dequantized weights
    name, qw = next(iter(res.qweights.items()))
    assert torch.equal(model.get_submodule(name).weight.data, qw.dequantize())
    assert torch.isfinite(_logits(model, windows)).all()
    with pytest.raises(LowbitError, match="alpha"):
        quantize_model(tiny_model("llama"), method, "w4g32", windows, alpha=0.5, progress=False)
