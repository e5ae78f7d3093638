"""Native format: bit-identical reload, atomic writes, no silent overwrite."""

import json

import pytest
import torch
from conftest import tiny_model

from lowbit.algorithms.gptq import GPTQConfig
from lowbit.api import quantize_model
from lowbit.errors import LowbitError
from lowbit.io import native
from lowbit.io.native import load_quantized, save_quantized
from lowbit.runtime.qlinear import QuantLinear


@pytest.mark.parametrize(
    "family,method,scheme,act_order",
    [
        ("llama", "gptq", "w4g32", True),
        ("llama", "rtn", "w3g32-asym", False),
        ("gpt2", "gptq", "w4g32-asym", False),
        ("opt", "rtn", "w8", False),
    ],
)
def test_reload_is_bit_identical(tmp_path, windows, family, method, scheme, act_order):
    model = tiny_model(family)
    res = quantize_model(
        model, method, scheme, windows, GPTQConfig(act_order=act_order), progress=False
    )
    out = save_quantized(
        tmp_path / "q", model, None, res.qweights, {"method": method}, conv1d=family == "gpt2"
    )
    back, tok = load_quantized(out)
    assert tok is None
    for name, qw in res.qweights.items():
        mod = back.get_submodule(name)
        assert isinstance(mod, QuantLinear)
        assert torch.equal(mod.weight_hat(), qw.dequantize())
    with torch.no_grad():
        a = model(input_ids=windows).logits
        b = back(input_ids=windows).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    if family != "gpt2":  # Conv1D multiplies in the other orientation: not bit-identical
        assert torch.equal(a, b)
    desc = json.loads((out / "lowbit.json").read_text())
    assert desc["layers"][name]["scheme"]["name"] == scheme


def test_existing_output_is_not_overwritten(tmp_path, windows):
    model = tiny_model("llama")
    res = quantize_model(model, "rtn", "w4g32", progress=False)
    save_quantized(tmp_path / "q", model, None, res.qweights, {})
    with pytest.raises(LowbitError, match="exists.*--overwrite"):
        save_quantized(tmp_path / "q", model, None, res.qweights, {})
    save_quantized(tmp_path / "q", model, None, res.qweights, {"x": 1}, overwrite=True)
    assert json.loads((tmp_path / "q" / "lowbit.json").read_text())["x"] == 1


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    res = quantize_model(model, "rtn", "w4g32", progress=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", boom)
    with pytest.raises(OSError):
        save_quantized(tmp_path / "q", model, None, res.qweights, {})
    assert list(tmp_path.iterdir()) == []
