"""Native format: bit-identical reload, atomic writes, no silent overwrite."""

import json

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.io import native
from lowbit.io.native import load_quantized, save_quantized
from lowbit.runtime.qlinear import QLinear


def quantized(model, method: str, scheme: str, windows=None, **options):
    return lowbit.quantize(model, lowbit.shorthand(method, scheme, **options), windows,
                           progress=False)


@pytest.mark.parametrize(
    "family,method,scheme,act_order",
    [
        ("llama", "gptq", "w4g32", True),
        ("llama", "rtn", "w3g32-asym", None),
        ("gpt2", "gptq", "w4g32-asym", False),
        ("opt", "rtn", "w8", None),
    ],
)
def test_reload_is_bit_identical(tmp_path, windows, family, method, scheme, act_order):
    model = tiny_model(family)
    # act-order with a g_idx (static groups, the default, store none)
    opts = {} if act_order is None else {"act_order": act_order, "static_groups": not act_order}
    res = quantized(model, method, scheme, windows if method == "gptq" else None, **opts)
    if act_order:
        assert any(gw.g_idx is not None for gw in res.weights.values())
    out = save_quantized(
        tmp_path / "q", model, None, res.weights, {"method": method}, conv1d=family == "gpt2"
    )
    back, tok = load_quantized(out)
    assert tok is None
    for name, gw in res.weights.items():
        mod = back.get_submodule(name)
        assert isinstance(mod, QLinear)
        assert torch.equal(mod.dequantized_weight(), gw.dequantize())
    with torch.no_grad():
        a = model(input_ids=windows).logits
        b = back(input_ids=windows).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    if family != "gpt2":  # Conv1D multiplies in the other orientation: not bit-identical
        assert torch.equal(a, b)
    desc = json.loads((out / "lowbit.json").read_text())
    assert desc["version"] == native.VERSION
    assert desc["layers"][name]["grid"] == scheme
    assert desc["layers"][name]["conv1d"] == (family == "gpt2")


def test_existing_output_is_not_overwritten(tmp_path):
    model = tiny_model("llama")
    res = quantized(model, "rtn", "w4g32")
    save_quantized(tmp_path / "q", model, None, res.weights, {})
    with pytest.raises(LowbitError, match="exists.*--overwrite"):
        save_quantized(tmp_path / "q", model, None, res.weights, {})
    save_quantized(tmp_path / "q", model, None, res.weights, {"x": 1}, overwrite=True)
    assert json.loads((tmp_path / "q" / "lowbit.json").read_text())["x"] == 1


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    res = quantized(model, "rtn", "w4g32")

    from lowbit.io import shards

    real, calls = shards._Shard.add, []

    def add(self, name, t):  # the disk fills up after a few tensors
        calls.append(name)
        if len(calls) > 3:
            raise OSError("disk full")
        real(self, name, t)

    monkeypatch.setattr(shards._Shard, "add", add)
    with pytest.raises(LowbitError, match="cannot write .*q: disk full"):
        save_quantized(tmp_path / "q", model, None, res.weights, {})
    assert list(tmp_path.iterdir()) == []


def test_transformers_refuses_a_native_folder(tmp_path):
    """transformers loaded version-1 folders with every quantized Linear randomly initialised
    (issue 14); version 2 has no model.safetensors, so it refuses."""
    import transformers as tf

    from lowbit.formats.grids import get_grid
    from lowbit.io.native import save_quantized
    from lowbit.methods.rtn import rtn

    m = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2))
    w = m.model.layers[0].mlp.down_proj.weight.detach()
    save_quantized(tmp_path / "q", m, None,
                   {"model.layers.0.mlp.down_proj": rtn(w, get_grid("w4g32"))}, {})
    with pytest.raises(OSError, match="no file named model.safetensors"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
