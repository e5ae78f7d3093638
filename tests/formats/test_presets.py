"""compressed-tensors preset names mean what they mean there: a model quantized with
``--scheme W4A16`` (etc.) exports a compressed-tensors config whose weight (and activation)
arguments are the library's own preset arguments."""

import json

import pytest
import torch
import transformers as tf
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.presets import preset, presets
from lowbit.recipe import shorthand

RUNNABLE = [n for n, p in presets().items() if not isinstance(p, str)]
# where lowbit's stored form differs from the preset on purpose (documented in README):
# FP8's weights get one scale per output channel instead of one per tensor
DIFFERS = {("FP8", "weights", "strategy"): ("tensor", "channel")}
ARGS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")


def _value(x):
    return getattr(x, "value", x)


@pytest.fixture(scope="module")
def model_and_calib():
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return cfg, torch.randint(0, 256, (4, 32))


def test_every_preset_is_runnable_or_refused_in_one_line():
    assert {"W4A16", "W4A16_ASYM", "W8A16", "W8A8", "INT8", "FP8", "FP8_DYNAMIC", "NVFP4A16",
            "MXFP4A16"} <= set(RUNNABLE)
    for name in set(PRESET_SCHEMES) - set(RUNNABLE):
        with pytest.raises(LowbitError) as e:
            preset(name)
        assert "\n" not in str(e.value) and name in str(e.value)
    assert preset("w4g64") is None and preset("nvfp4") is None  # lowbit's own names


def _export(cfg, calib, name, p, tmp_path) -> dict:
    model = tf.LlamaForCausalLM(cfg).eval()
    recipe = shorthand(None if p.method else "rtn", name)
    res = lowbit.quantize(model, recipe, calib, progress=False)
    out = lowbit.save(tmp_path / "ct", model, None, res, fmt="compressed-tensors")
    return json.loads((out / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_preset_exports_the_presets_own_arguments(name, model_and_calib, tmp_path):
    cfg, calib = model_and_calib
    p = preset(name)
    if p.scheme.startswith("mx"):
        # lowbit writes MX grids to GGUF and native folders only (not yet compressed-tensors)
        with pytest.raises(LowbitError, match="no compressed-tensors layout"):
            _export(cfg, calib, name, p, tmp_path)
        return
    qcfg = _export(cfg, calib, name, p, tmp_path)
    (group,) = qcfg["config_groups"].values()
    for part in ("weights", "input_activations"):
        want = PRESET_SCHEMES[name].get(part)
        got = group.get(part)
        assert (want is None) == (got is None), part
        if want is None:
            continue
        for arg in ARGS:
            w, g = _value(getattr(want, arg)), got.get(arg)
            if (name, part, arg) in DIFFERS:
                assert (w, g) == DIFFERS[name, part, arg]
            else:
                assert w == g, (part, arg, w, g)
