"""W8A8 models (SmoothQuant, naive W8A8) as compressed-tensors ``int-quantized`` checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.serving import (
    check_target,
    load_checkpoint,
    quantized_weights,
    read_checkpoint,
    write_checkpoint,
)
from lowbit.runtime.w8a8 import W8A8Linear

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


def int8_model(method: str, scheme: str | None, windows):
    m = tiny_model("llama")
    res = lowbit.quantize(m, lowbit.shorthand(method, scheme), windows, progress=False)
    assert res.weights  # the runtime modules, swapped into the model
    return m


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method,scheme", [("smoothquant", "w8a8"), ("w8a8", "w8a8-static")])
def test_library_decompresses_w8a8_bit_for_bit(tmp_path, windows, method, scheme):
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    m = int8_model(method, scheme, windows)
    qw = quantized_weights(m)
    assert qw and all(isinstance(mod, W8A8Linear) for mod in qw.values())
    r = write_checkpoint(tmp_path / "ct", "compressed-tensors", m, None, qw, {},
                         dtype="float32")
    assert r["scheme"] == scheme
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized"
    group = cfg["config_groups"]["group_0"]
    acts = group["input_activations"]
    assert (acts["strategy"], acts["dynamic"]) == (
        ("token", True) if scheme == "w8a8" else ("tensor", False))
    qs = QuantizationScheme.model_validate(group)
    t = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, mod in qw.items():
        sd = {k[len(name) + 1 :]: v for k, v in t.items() if k.startswith(name + ".")}
        assert sd["weight"].dtype == torch.int8 and torch.equal(sd["weight"], mod.qweight)
        assert ("input_scale" in sd) == (scheme == "w8a8-static")
        got = IntQuantizationCompressor.decompress(
            {"weight": sd["weight"], "weight_scale": sd["weight_scale"]}, qs)["weight"]
        assert torch.equal(got, mod.dequantized_weight())


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static"])
def test_w8a8_round_trip_import(tmp_path, windows, scheme):
    m = int8_model("smoothquant", scheme, windows)
    qw = quantized_weights(m)
    write_checkpoint(tmp_path / "ct", "compressed-tensors", m, None, qw, {}, dtype="float32")
    _, back, _ = read_checkpoint(tmp_path / "ct")
    assert set(back) == set(qw)
    for name, mod in qw.items():
        assert torch.equal(back[name].qweight, mod.qweight)
        assert torch.equal(back[name].w_scale, mod.w_scale)
        assert back[name].act == mod.act and torch.equal(back[name].x_scale, mod.x_scale)
    model, _ = load_checkpoint(tmp_path / "ct")
    # the smoothed norms travel with the checkpoint: same function as lowbit's model
    torch.testing.assert_close(logits(model), logits(m), atol=1e-5, rtol=1e-5)


def test_llm_int8_has_no_serving_layout(tmp_path, windows):
    m = int8_model("llm-int8", None, windows)
    with pytest.raises(LowbitError, match="LLM.int8"):
        quantized_weights(m)


@pytest.mark.parametrize("scheme", ["w8a8-fp8", "w8a8-fp8-static"])
def test_fp8_w8a8_round_trip(tmp_path, windows, scheme):
    """FP8 W8A8 (the FP8_DYNAMIC / FP8 presets) as float-quantized with FP8 activations; the
    library's own decompressor gives lowbit's weights bit for bit."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    m = int8_model("w8a8", scheme, windows)
    qw = quantized_weights(m)
    assert not check_target({"x.q_proj": (64, 64)}, scheme, "compressed-tensors").errors
    r = write_checkpoint(tmp_path / "ct", "compressed-tensors", m, None, qw, {}, dtype="float32")
    assert r["scheme"] == scheme
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = cfg["config_groups"]["group_0"]
    assert cfg["format"] == "float-quantized" and group["input_activations"]["type"] == "float"
    qs = QuantizationScheme.model_validate(group)
    t = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, mod in qw.items():
        got = FloatQuantizationCompressor.decompress(
            {"weight": t[f"{name}.weight"], "weight_scale": t[f"{name}.weight_scale"]},
            qs)["weight"]
        assert torch.equal(got, mod.dequantized_weight())
    _, back, _ = read_checkpoint(tmp_path / "ct")
    for name, mod in qw.items():
        assert torch.equal(back[name].qweight.view(torch.uint8), mod.qweight.view(torch.uint8))
        assert back[name].act == mod.act and torch.equal(back[name].x_scale, mod.x_scale)
    model, _ = load_checkpoint(tmp_path / "ct")
    torch.testing.assert_close(logits(model), logits(m), atol=1e-5, rtol=1e-5)


def test_w8a8_refused_by_weight_only_layouts(tmp_path, windows):
    m = int8_model("w8a8", "w8a8", windows)
    with pytest.raises(LowbitError, match="GPTQ layout holds .* not w8a8"):
        write_checkpoint(tmp_path / "g", "gptq", m, None, quantized_weights(m), {})
    with pytest.raises(LowbitError, match="AWQ layout holds .* not w8a8"):
        write_checkpoint(tmp_path / "g", "awq", m, None, quantized_weights(m), {})
    assert not (tmp_path / "g").exists()
    rep = check_target({"x.q_proj": (64, 64)}, "w8a8", "gptq")
    assert "gptq holds integer schemes (w2..w8), not w8a8" in rep.errors[0]


def test_preflight_w8a8_tensor_parallel():
    """int8 per-channel weights are not packed or grouped: only the splits and heads matter."""
    shapes = {"model.layers.0.self_attn.q_proj": (576, 576),
              "model.layers.0.mlp.down_proj": (576, 1536)}
    for scheme in ("w8a8", "w8a8-static"):
        assert not check_target(shapes, scheme, "compressed-tensors", 3, heads=(9, 3)).errors
        rep = check_target(shapes, scheme, "compressed-tensors", 2, heads=(9, 3))
        assert any("9 attention heads" in e for e in rep.errors)
    rep = check_target({"x.down_proj": (64, 100)}, "w8a8", "compressed-tensors", 8)
    assert any("in_features 100 does not split into 8" in e for e in rep.errors)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static"])
def test_transformers_loads_w8a8(tmp_path, windows, scheme):
    """transformers (with compressed-tensors) decompresses the int8 weights to exactly lowbit's
    and fake-quantizes the activations itself. Its per-token rounding is not vLLM's: it scales
    by absmax / 127.5 into [-128, 127] where lowbit (like vLLM's int8 kernels) uses absmax /
    127 into [-127, 127], so the logits agree closely but not to float tolerance."""
    import transformers as tf

    m = int8_model("smoothquant", scheme, windows)
    qw = quantized_weights(m)
    write_checkpoint(tmp_path / "ct", "compressed-tensors", m, None, qw, {}, dtype="float32")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    for name, mod in qw.items():
        lin = hf.get_submodule(name)
        w = lin.weight  # int8 codes when the model stays compressed, else decompressed fp32
        if w.dtype == torch.int8:
            assert torch.equal(w, mod.qweight)
            w = w.float() * lin.weight_scale.float()
        assert torch.equal(w, mod.dequantized_weight())
    ref = logits(m)
    assert (logits(hf) - ref).abs().max() < 0.02 * ref.abs().max()
