"""FP8 and NVFP4 weights in compressed-tensors checkpoints: the library's own decompressors and
transformers' loader read what lowbit writes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import tiny_model
from safetensors.torch import load_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.serving import check_target, load_checkpoint, read_checkpoint, write_checkpoint
from lowbit.io.serving.ct_float import plus_zero

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
FP8 = ["fp8-e4m3", "fp8-e4m3-tensor", "fp8-e4m3-b128"]


def quantized(grid: str):
    m = tiny_model("llama")
    return m, lowbit.quantize(m, lowbit.shorthand("rtn", grid), None, progress=False)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def layer(path, name: str) -> dict[str, torch.Tensor]:
    t = load_file(str(path / "model.safetensors"))
    return {k[len(name) + 1 :]: v for k, v in t.items() if k.startswith(name + ".")}


def _scheme(path):
    from compressed_tensors.quantization import QuantizationScheme

    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    return cfg, QuantizationScheme.model_validate(cfg["config_groups"]["group_0"])


@pytest.mark.parametrize("grid", FP8)
def test_library_decompresses_fp8_bit_for_bit(tmp_path, grid):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor

    m, res = quantized(grid)
    write_checkpoint(tmp_path / "ct", "compressed-tensors", m, None, res.weights, {})
    cfg, qs = _scheme(tmp_path / "ct")
    assert cfg["format"] == "float-quantized" and qs.weights.type == "float"
    for name, gw in res.weights.items():
        sd = layer(tmp_path / "ct", name)
        assert set(sd) == {"weight", "weight_scale"} and sd["weight"].dtype == torch.float8_e4m3fn
        got = FloatQuantizationCompressor.decompress(sd, qs)["weight"]
        assert got.dtype == torch.float32 and torch.equal(got, gw.dequantize())


def test_fp8_block_scales_cover_partial_blocks(tmp_path):
    m, res = quantized("fp8-e4m3-b128")
    write_checkpoint(tmp_path / "ct", "compressed-tensors", m, None, res.weights, {})
    sd = layer(tmp_path / "ct", "model.layers.0.mlp.down_proj")  # 64 x 128
    assert tuple(sd["weight_scale"].shape) == (1, 1)
    sd = layer(tmp_path / "ct", "model.layers.0.mlp.up_proj")  # 128 x 64: one partial block
    assert tuple(sd["weight_scale"].shape) == (1, 1)


def test_library_decompresses_nvfp4(tmp_path):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    from lowbit.formats.minifloat import E2M1, decode

    m, res = quantized("nvfp4")
    write_checkpoint(tmp_path / "ct", "compressed-tensors", m, None, res.weights, {})
    cfg, qs = _scheme(tmp_path / "ct")
    assert cfg["format"] == "nvfp4-pack-quantized"
    for name, gw in res.weights.items():
        sd = layer(tmp_path / "ct", name)
        assert sd["weight_scale"].dtype == torch.float8_e4m3fn
        # the elements and block scales are lowbit's, exactly
        out_f, in_f = gw.shape
        elems = unpack_fp4_from_uint8(sd["weight_packed"], out_f, in_f, dtype=torch.float32)
        assert torch.equal(elems, decode(gw.codes, E2M1))
        assert torch.equal(sd["weight_scale"].view(torch.uint8), gw.to_tensors()["scale_codes"])
        # the library dequantizes NVFP4 in bfloat16 (its unpacker's dtype): e2m1 * bf16(s / G),
        # rounded to bf16, so it agrees with lowbit's fp32 weights to bf16 precision
        got = NVFP4PackedCompressor.decompress(dict(sd), qs)["weight"]
        assert got.dtype == torch.bfloat16
        want = gw.dequantize()
        assert ((got.float() - want).abs() <= 2 * 2.0**-8 * want.abs()).all()
        assert torch.equal(got.float() == 0, want == 0)


@pytest.mark.parametrize("grid", ["fp8-e4m3", "fp8-e4m3-tensor"])
def test_transformers_loads_fp8(tmp_path, grid):
    m, res = quantized(grid)
    write_checkpoint(tmp_path / "ct", "compressed-tensors", m, None, res.weights, {},
                     dtype="float32")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ref = logits(m)
    torch.testing.assert_close(logits(hf), ref, atol=1e-4, rtol=1e-4)
    assert (logits(tiny_model("llama")) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("grid", [*FP8, "nvfp4"])
def test_float_round_trip_import(tmp_path, grid):
    m, res = quantized(grid)
    write_checkpoint(tmp_path / "ct", "compressed-tensors", m, None, res.weights, {},
                     dtype="float32")
    _, back, _ = read_checkpoint(tmp_path / "ct")
    assert set(back) == set(res.weights)
    for name, gw in res.weights.items():
        assert back[name].grid.name == grid
        codes = plus_zero(gw.codes) if grid == "nvfp4" else gw.codes  # -0 is packed as +0
        assert torch.equal(back[name].codes, codes)
        if grid != "nvfp4":
            assert torch.equal(back[name].dequantize(), gw.dequantize())
        else:  # the tensor scale comes back as 1 / (1 / g): equal or one ulp off
            torch.testing.assert_close(back[name].dequantize(), gw.dequantize(), rtol=3e-7,
                                       atol=0)
    model, _ = load_checkpoint(tmp_path / "ct")
    torch.testing.assert_close(logits(model), logits(m), atol=1e-5, rtol=1e-5)


def test_formats_without_a_layout_are_refused(tmp_path):
    for grid, fmt in [("fp8-e5m2", "compressed-tensors"), ("mxfp4", "compressed-tensors"),
                      ("fp8-e4m3", "gptq")]:
        m, res = quantized(grid)
        with pytest.raises(LowbitError, match="E4M3|nvfp4|integer"):
            write_checkpoint(tmp_path / "x", fmt, m, None, res.weights, {})
        assert not (tmp_path / "x").exists()


def test_preflight_float_tensor_parallel():
    from lowbit.formats.grids import get_grid

    shapes = {"model.layers.0.self_attn.q_proj": (576, 576),
              "model.layers.0.mlp.down_proj": (576, 1536)}
    heads = (9, 3)
    assert not check_target(shapes, get_grid("nvfp4"), "compressed-tensors", 3, heads=heads).errors
    # 1536 / 2 = 768 input columns: whole blocks of 16, but not of 128
    assert not check_target(shapes, get_grid("nvfp4"), "compressed-tensors", 1).errors
    rep = check_target(shapes, get_grid("fp8-e4m3-b128"), "compressed-tensors", 3, heads=heads)
    assert any("blocks of 128" in e for e in rep.errors)
    bad = check_target({"x.q_proj": (64, 40)}, get_grid("nvfp4"), "compressed-tensors")
    assert any("% 16" in e for e in bad.errors)
    rep = check_target(shapes, get_grid("nvfp4"), "awq")
    assert rep.errors and "compressed-tensors" in rep.errors[0]


def test_fp8_exports_from_a_lowbit_folder(tmp_path):
    from lowbit.io.native import load_quantized, read_description, save_quantized
    from lowbit.io.serving import quantized_weights

    m, res = quantized("fp8-e4m3")
    native = tmp_path / "native"
    save_quantized(native, m, None, res.weights, {"method": "rtn", "base_model": "tiny"})
    model, tok = load_quantized(native)
    ref = logits(model)
    weights = quantized_weights(model)
    assert {w.grid.name for w in weights.values()} == {"fp8-e4m3"}
    write_checkpoint(tmp_path / "ct", "compressed-tensors", model, tok, weights,
                     read_description(native), dtype="float32")
    card = (tmp_path / "ct" / "README.md").read_text()
    assert "fp8-e4m3: floating-point elements" in card
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "ct")[0]), ref)
