"""The ``kv`` recipe step: float8 scales measured on the quantized model, recorded in
lowbit.json, carried by compressed-tensors as ``kv_cache_scheme`` with ``self_attn.k_scale`` /
``v_scale`` shaped as compressed-tensors itself shapes them, read back, and used by default when
the model generates; the command line ``lowbit quantize --kv``."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import lowbit_cli, one_line_error
from conftest import tiny_model
from safetensors.torch import load_file
from torch import nn

from lowbit import quantize, save
from lowbit.errors import LowbitError
from lowbit.formats.kv import parse_kv
from lowbit.io.serving.ct_kv import kv_note
from lowbit.methods.kvcache import KVCache, scales_from_data
from lowbit.methods.rtn import RTN
from lowbit.models import load_model
from lowbit.recipe import recipe_from_data
from lowbit.runtime.kvcache import calibrate_kv


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["fp8", "fp8-head"])
def test_scales_are_measured_on_the_quantized_model_and_survive_every_format(
        fmt, calib, tmp_path):
    model = tiny_model("llama")
    res = quantize(model, [RTN(scheme="w4g32"), KVCache(format=fmt)], calib, progress=False)
    rec = res.kv_cache
    assert rec["format"] == fmt and len(rec["scales"]) == model.config.num_hidden_layers
    # the same numbers as calibrating the quantized model by hand: measured after rounding
    want = calibrate_kv(model, parse_kv(fmt), calib)
    for got, ref in zip(scales_from_data(rec["scales"]), want, strict=True):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    save(tmp_path / "nat", model, None, res)
    assert json.loads((tmp_path / "nat" / "lowbit.json").read_text())["kv_cache"] == rec
    assert load_model(str(tmp_path / "nat"))[0].kv_cache_record == rec
    save(tmp_path / "ct", model, None, res, fmt="compressed-tensors")
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    kv = qcfg["kv_cache_scheme"]
    assert (kv["type"], kv["num_bits"], kv["symmetric"], kv["dynamic"]) == ("float", 8, True,
                                                                           False)
    assert kv["strategy"] == ("attn_head" if fmt == "fp8-head" else "tensor")
    back = load_model(str(tmp_path / "ct"))[0]
    assert back.kv_cache_record == rec  # read from the checkpoint's tensors and config


@pytest.mark.parametrize("fmt", ["fp8", "fp8-head"])
def test_scale_tensors_have_compressed_tensors_names_and_shapes(fmt, calib, tmp_path):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams
    from compressed_tensors.quantization.quant_metadata import KVCacheScaleType

    model = tiny_model("llama")
    res = quantize(model, [RTN(scheme="w4g32"), KVCache(format=fmt)], calib, progress=False)
    save(tmp_path / "ct", model, None, res, fmt="compressed-tensors")
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    cfg = model.config
    # the library's own rule for the parameters it registers on an attention module
    ref = nn.Module()
    ref.register_parameter("w", nn.Parameter(torch.zeros(1)))
    args = QuantizationArgs.model_validate(qcfg["kv_cache_scheme"])
    for base in ("k", "v"):
        initialize_qparams(ref, base, args, observed_shape=(
            cfg.num_key_value_heads, None, cfg.hidden_size // cfg.num_attention_heads),
            observed_dtype=torch.float16, force_zero_point=False)
    names = {KVCacheScaleType.KEY.value, KVCacheScaleType.VALUE.value}
    assert {n for n, _ in ref.named_parameters()} - {"w"} == names
    for i in range(cfg.num_hidden_layers):
        for n in names:
            got = tensors[f"model.layers.{i}.self_attn.{n}"]
            assert got.shape == getattr(ref, n).shape
            assert torch.equal(got.flatten(), torch.tensor(
                res.kv_cache["scales"][i][n[0] == "v"], dtype=torch.float32).flatten())


def test_formats_without_a_checkpoint_form_are_named(calib, tmp_path):
    assert kv_note("compressed-tensors", "fp8") is None
    assert "E4M3" in kv_note("compressed-tensors", "fp8-e5m2")
    assert "no KV-cache field" in kv_note("gptq", "fp8")
    model = tiny_model("llama")
    res = quantize(model, [RTN(scheme="w4g32"), KVCache(format="kivi-k4v4-r64")], None,
                   progress=False)
    assert res.kv_cache == {"format": "kivi-k4v4-r64"}  # integer formats need no data
    save(tmp_path / "ct", model, None, res, fmt="compressed-tensors")
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qcfg.get("kv_cache_scheme") is None


def test_recipe_checks():
    r = recipe_from_data({"steps": [{"rtn": {"scheme": "w4g32"}}, {"kv": {"format": "int8"}}]})
    assert r.steps[-1].spec.name == "int8" and not r.needs_data()
    assert recipe_from_data([{"rtn": {}}, {"kv": {"format": "fp8"}}]).needs_data()
    with pytest.raises(LowbitError, match="unknown KV-cache format"):
        recipe_from_data([{"rtn": {}}, {"kv": {"format": "int3"}}])
    with pytest.raises(LowbitError, match="must come before"):
        from lowbit.api import plan

        plan(tiny_model("llama"), [KVCache(format="int8"), RTN()])
    with pytest.raises(LowbitError, match="at most one kv"):
        from lowbit.api import plan

        plan(tiny_model("llama"), [RTN(), KVCache(format="int8"), KVCache(format="fp8")])


def test_quantize_with_kv_from_the_command_line(tiny_ckpt, tmp_path):
    ckpt, text = tiny_ckpt
    out = tmp_path / "q"
    r = lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--kv", "fp8",
                   "--calib", text, "--calib-samples", "4", "--seq-len", "32",
                   "--format", "compressed-tensors", "--out", out, "--quiet")
    assert "KV cache: fp8" in r.out
    desc = json.loads((out / "lowbit.json").read_text())
    assert desc["kv_cache"]["format"] == "fp8" and desc["recipe"]["steps"][-1]["step"] == "kv"
    gen = tmp_path / "g.json"
    lowbit_cli("generate", out, "--prompt", "hello", "--max-new-tokens", "4", "--json", gen)
    assert json.loads(gen.read_text())["kv"] == "fp8"  # the recorded cache, by default
    lowbit_cli("generate", out, "--prompt", "hello", "--max-new-tokens", "4", "--kv", "fp16",
               "--json", gen)
    assert "kv" not in json.loads(gen.read_text())
    r = lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--kv",
                   "kivi-k2v2-r64", "--format", "compressed-tensors", "--out", tmp_path / "k",
                   "--quiet")
    assert "not in the compressed-tensors checkpoint" in r.err
    r = lowbit_cli("export", tmp_path / "k", tmp_path / "k.gguf", "--quiet")
    assert "--cache-type-k q4_1 --cache-type-v q4_1 -fa" in r.err
    one_line_error(lowbit_cli("quantize", ckpt, "--scheme", "w4g32", "--kv", "int3", "--out",
                              tmp_path / "x", ok=False), "unknown KV-cache format")


def test_llamacpp_flags_name_real_cache_types():
    import gguf

    from lowbit.formats.kv import llamacpp_cache_flags

    for name in ("int8", "fp8", "kivi-k4v4-r128", "kivi-k2v2-r128", "kvquant-k4v8-r128"):
        flags, _ = llamacpp_cache_flags(name)
        types = flags.split()[1::2][:2]
        for t in types:  # llama.cpp takes ggml's type names, lower case
            assert t.upper() in gguf.GGMLQuantizationType.__members__
    assert llamacpp_cache_flags("kivi-k4v4-r128")[0].startswith("--cache-type-k q4_1 "
                                                                "--cache-type-v q4_1")
    assert "under 4 bits" in llamacpp_cache_flags("kivi-k2v2-r128")[1]
    assert llamacpp_cache_flags("int8")[0].startswith("--cache-type-k q8_0")
    note = llamacpp_cache_flags("pertoken-k4v4-r0-o1-h")[1]
    assert "exact outliers" in note and "rotate" in note and "window" not in note


def test_model_card_names_the_cache(calib, tmp_path):
    model = tiny_model("llama")
    res = quantize(model, [RTN(scheme="w4g32"), KVCache(format="fp8")], calib, progress=False)
    save(tmp_path / "ct", model, None, res, fmt="compressed-tensors")
    card = (tmp_path / "ct" / "README.md").read_text()
    assert "| KV cache | fp8: float8 E4M3" in card and "--kv-cache-dtype fp8" in card
