"""SmoothQuant / W8A8 / LLM.int8() on tiny models: folding, modules, accuracy, save and reload."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from methods.test_awq import logits, randomize_norms

import lowbit
from lowbit.arch import spec_for
from lowbit.errors import LowbitError
from lowbit.io.native import load_quantized
from lowbit.methods.smoothquant import smooth_scales
from lowbit.pipeline.driver import observe_model
from lowbit.pipeline.stats import load_stats, save_stats
from lowbit.runtime.fp8 import FP8Linear
from lowbit.runtime.int8_mixed import Int8MixedLinear
from lowbit.runtime.w8a8 import W8A8Linear


def test_smooth_scales_formula():
    xmax = torch.tensor([4.0, 1.0, 0.0, 9.0])
    wmax = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smooth_scales(xmax, wmax, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] == 1 and s[3] == 1  # dead channel / no weight: unchanged
    assert torch.allclose(smooth_scales(xmax[:2], wmax[:2], 1.0), xmax[:2])
    with pytest.raises(LowbitError, match="alpha"):
        smooth_scales(xmax, wmax, 1.5)


class _Keep(lowbit.W8A8):
    """A replacer that keeps the Linear: SmoothQuant's folding alone must keep the function."""

    step = "test-keep"

    def make(self, w, bias, stats):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        lin.weight.data.copy_(w)
        if bias is not None:
            lin.bias.data.copy_(bias)
        lin.out_features, lin.in_features = w.shape
        return lin, {}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt2"])
def test_smoothing_folds_exactly(family, windows):
    model = tiny_model(family)
    randomize_norms(model)
    ref = logits(model, windows)
    w0 = model.get_input_embeddings().weight.clone()
    res = lowbit.quantize(model, [lowbit.SmoothQuant(alpha=0.5), _Keep()], windows,
                          progress=False)
    rows = [r for r in res.rows if r.get("step") == "smoothquant"]
    assert len(rows) == 2 * 2 and any(r["scale_max"] / r["scale_min"] > 1.1 for r in rows)
    assert torch.equal(model.get_input_embeddings().weight, w0)
    assert torch.allclose(logits(model, windows), ref, atol=1e-4, rtol=1e-4)
    # the statistics it observed are kept for every Linear (lowbit inspect --stats)
    assert len(res.stats) == 2 * len(spec_for(model).linears)


@pytest.mark.parametrize(
    "steps,cls",
    [([lowbit.SmoothQuant(), lowbit.W8A8(scheme="w8a8", kernel="emulate")], W8A8Linear),
     ([lowbit.SmoothQuant(), lowbit.W8A8(scheme="w7a8-static", kernel="emulate")], W8A8Linear),
     ([lowbit.W8A8(scheme="w8a8-static", kernel="emulate")], W8A8Linear),
     ([lowbit.W8A8(scheme="w8a8-fp8-static")], FP8Linear),
     ([lowbit.LLMInt8(kernel="emulate")], Int8MixedLinear)],
)
def test_int8_steps_quantize_save_reload(tmp_path, windows, steps, cls):
    ref = logits(tiny_model("llama"), windows)
    model = tiny_model("llama")
    res = lowbit.quantize(model, steps, windows, progress=False)
    assert len(res.weights) == 14
    assert all(isinstance(m, cls) for m in res.weights.values())
    assert all(isinstance(model.get_submodule(n), cls) for n in res.weights)
    out = logits(model, windows)
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < (0.1 if cls is FP8Linear else 0.05)  # E4M3 keeps 3 mantissa bits
    assert 8.0 < res.bits_per_weight() < 9.0
    lowbit.save(tmp_path / "q", model, None, res)
    back, _ = load_quantized(tmp_path / "q")
    for name, m in res.weights.items():
        b = back.get_submodule(name)
        assert isinstance(b, cls) and torch.equal(b.qweight.view(torch.uint8),
                                                  m.qweight.view(torch.uint8))
    assert torch.equal(logits(back, windows), out)


def test_static_int8_scale_is_the_observed_range_after_smoothing(windows):
    """w8a8-static: each layer's activation scale covers the max |x| its input reaches in the
    smoothed model (checked against hooks on the quantized model's own forward)."""
    model = tiny_model("llama")
    randomize_norms(model)
    res = lowbit.quantize(model, [lowbit.SmoothQuant(), lowbit.W8A8(scheme="w8a8-static",
                                                                    kernel="emulate")],
                          windows, progress=False)
    rows = {r["name"]: r for r in res.rows if "x_absmax" in r}
    name = "model.layers.0.self_attn.q_proj"  # its input does not depend on quantization
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    logits(model, windows)
    h.remove()
    assert rows[name]["x_absmax"] == pytest.approx(float(seen[0].abs().max()), rel=1e-5)
    m = model.get_submodule(name)
    assert float(m.x_scale) == pytest.approx(rows[name]["x_absmax"] / 127.0, rel=1e-6)


def test_w8a8_kernels_agree_on_a_model(windows):
    """oneDNN int8 and the emulated product give the same model output to rounding."""
    a, b = tiny_model("llama"), tiny_model("llama")
    lowbit.quantize(a, [lowbit.W8A8(scheme="w7a8", kernel="onednn")], None, progress=False)
    lowbit.quantize(b, [lowbit.W8A8(scheme="w7a8", kernel="emulate")], None, progress=False)
    assert torch.allclose(logits(a, windows), logits(b, windows), atol=1e-4, rtol=1e-4)


def test_llm_int8_counts_outliers(windows):
    model = tiny_model("llama")
    lowbit.quantize(model, [lowbit.LLMInt8(threshold=0.5, kernel="emulate")], None,
                    progress=False)
    logits(model, windows)
    fr = {n: m.outlier_fraction for n, m in model.named_modules()
          if isinstance(m, Int8MixedLinear)}
    assert len(fr) == 14 and all(0 <= f <= 1 for f in fr.values())
    assert max(fr.values()) > 0


def test_bad_inputs(windows):
    with pytest.raises(LowbitError, match="needs calibration"):
        lowbit.quantize(tiny_model("llama"), lowbit.shorthand("smoothquant"), None,
                        progress=False)
    with pytest.raises(LowbitError, match="w8a8 takes the schemes"):
        lowbit.shorthand("smoothquant", "w4g64")
    with pytest.raises(LowbitError, match="kernel must be one of"):
        lowbit.W8A8(scheme="w8a8-fp8", kernel="onednn")
    with pytest.raises(LowbitError, match="--threshold is for llm-int8; gptq does not take it"):
        lowbit.shorthand("gptq", "w4g64", threshold=4.0)
    model = tiny_model("llama")
    model.model.layers[1].post_attention_layernorm.weight.data[0] = float("nan")
    with pytest.raises(LowbitError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        lowbit.quantize(model, lowbit.shorthand("smoothquant"), windows.repeat(30, 1),
                        progress=False)


def test_stats_save_load(tmp_path, windows):
    model = tiny_model("qwen2")
    st = observe_model(model, spec_for(model), windows, {"absmax", "token_absmax"},
                       progress=False)
    name = "model.layers.0.self_attn.q_proj"
    assert st[name].n == windows.numel() and st[name].token_absmax.shape == (windows.numel(),)
    assert torch.allclose(st[name].token_absmax.max(), st[name].absmax.max())
    save_stats(tmp_path / "s.safetensors", st)
    back = load_stats(tmp_path / "s.safetensors")
    assert set(back) == set(st)
    assert torch.equal(back[name].absmax, st[name].absmax) and back[name].n == st[name].n


def test_smoothquant_then_gptq_rounds_activations_of_a_grid(windows):
    """``smoothquant+gptq`` with an activation-bit grid: the norms are smoothed, GPTQ rounds
    every Linear onto w4g64a8, and the forward pass rounds their inputs per token."""
    from lowbit.runtime.qlinear import QLinear

    ref = logits(tiny_model("llama"), windows)
    model = tiny_model("llama")
    res = lowbit.quantize(model, lowbit.shorthand("smoothquant+gptq", "w4g64a8"), windows,
                          progress=False)
    assert sum(r.get("step") == "smoothquant" for r in res.rows) == 2 * 2
    layers = [model.get_submodule(n) for n in res.weights]
    assert len(layers) == 14 and all(isinstance(m, QLinear) and m.grid.act_bits == 8
                                     for m in layers)
    out = logits(model, windows)
    err = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < err < 0.2
