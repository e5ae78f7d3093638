"""SmoothQuant / W8A8 / LLM.int8() on tiny models: modules, accuracy, save and reload."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lowbit.api import quantize_model
from lowbit.arch import spec_for
from lowbit.errors import LowbitError
from lowbit.io.native import load_quantized, save_quantized
from lowbit.methods.int8_methods import outlier_fractions, smooth_scales
from lowbit.pipeline.act_stats import collect_act_stats, load_act_stats, save_act_stats
from lowbit.runtime.int8_mixed import Int8MixedLinear
from lowbit.runtime.w8a8 import W8A8Linear


def _logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows, use_cache=False).logits


def test_smooth_scales_formula():
    xmax = torch.tensor([4.0, 1.0, 0.0, 9.0])
    wmax = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smooth_scales(xmax, wmax, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] == 1 and s[3] == 1  # dead channel / no weight: unchanged
    assert torch.allclose(smooth_scales(xmax[:2], wmax[:2], 1.0), xmax[:2])
    with pytest.raises(LowbitError, match="alpha"):
        smooth_scales(xmax, wmax, 1.5)


@pytest.mark.parametrize(
    "method,scheme,cls",
    [("smoothquant", "w8a8", W8A8Linear), ("smoothquant", "w7a8-static", W8A8Linear),
     ("w8a8", "w8a8-static", W8A8Linear), ("llm-int8", "", Int8MixedLinear)],
)
def test_int8_methods_quantize_save_reload(tmp_path, windows, method, scheme, cls):
    base = tiny_model("llama")
    ref = _logits(base, windows)
    model = tiny_model("llama")
    res = quantize_model(model, method, scheme, windows, progress=False, kernel="emulate")
    assert len(res.qweights) == 14
    assert all(isinstance(m, cls) for m in res.qweights.values())
    out = _logits(model, windows)
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05
    assert 8.0 < res.bits_per_weight() < 9.0
    save_quantized(tmp_path / "q", model, None, res.qweights,
                   {"method": method, "scheme": res.scheme.to_dict()})
    back, _ = load_quantized(tmp_path / "q")
    for name, m in res.qweights.items():
        b = back.get_submodule(name)
        assert isinstance(b, cls) and torch.equal(b.qweight, m.qweight)
    assert torch.equal(_logits(back, windows), out)


def test_w8a8_kernels_agree_on_a_model(windows):
    """oneDNN int8 and the emulated product give the same model output to rounding."""
    a, b = tiny_model("llama"), tiny_model("llama")
    quantize_model(a, "w8a8", "w7a8", windows, progress=False, kernel="onednn")
    quantize_model(b, "w8a8", "w7a8", windows, progress=False, kernel="emulate")
    assert torch.allclose(_logits(a, windows), _logits(b, windows), atol=1e-4, rtol=1e-4)


def test_llm_int8_counts_outliers(windows):
    model = tiny_model("llama")
    quantize_model(model, "llm-int8", "", None, progress=False, threshold=0.5, kernel="emulate")
    _logits(model, windows)
    fr = outlier_fractions(model)
    assert len(fr) == 14 and all(0 <= f <= 1 for f in fr.values())
    assert max(fr.values()) > 0


def test_bad_inputs(windows):
    with pytest.raises(LowbitError, match="needs calibration"):
        quantize_model(tiny_model("llama"), "smoothquant", "w8a8", None, progress=False)
    with pytest.raises(LowbitError, match="--scheme"):
        quantize_model(tiny_model("llama"), "smoothquant", "w4g64", windows, progress=False)
    model = tiny_model("llama")
    model.model.layers[1].post_attention_layernorm.weight.data[0] = float("nan")
    with pytest.raises(LowbitError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        collect_act_stats(model, spec_for(model), windows.repeat(30, 1), progress=False)


def test_act_stats_save_load(tmp_path, windows):
    model = tiny_model("qwen2")
    with pytest.warns(UserWarning, match="calibration tokens"):
        st = collect_act_stats(model, spec_for(model), windows, progress=False)
    name = "model.layers.0.self_attn.q_proj"
    assert st[name].n == windows.numel() and st[name].token_absmax.shape == (windows.numel(),)
    assert torch.allclose(st[name].token_absmax.max(), st[name].absmax.max())
    save_act_stats(tmp_path / "s.safetensors", st)
    back = load_act_stats(tmp_path / "s.safetensors")
    assert set(back) == set(st)
    assert torch.equal(back[name].absmax, st[name].absmax) and back[name].n == st[name].n
