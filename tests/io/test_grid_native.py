"""Grid weights in the native format: exact stored forms, bit-identical reload, equal logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import TINY, tiny_model

import lowbit
from lowbit.formats.grids import GRID_NAMES, get_grid
from lowbit.formats.pack import unpack
from lowbit.formats.weight import GridWeight
from lowbit.io.native import load_quantized, save_quantized
from lowbit.methods.rtn import rtn
from lowbit.runtime.qlinear import QLinear

W = torch.randn(40, 128, generator=torch.Generator().manual_seed(3)) * 0.05
W[3, 7] = 1.5  # an outlier: saturates the MX / ternary grids


def roundtrip(gw: GridWeight) -> GridWeight:
    return GridWeight.from_tensors(gw.grid, gw.shape, gw.to_tensors())


@pytest.mark.parametrize(
    "name", [*GRID_NAMES, "nf4-dq-g128", "fp4-g16", "sq2", "mxfp4-ceil", "mxfp8-e4m3-mse",
             "w4g32", "w4g32-asym"]
)
def test_stored_form_is_exact_and_compact(name: str) -> None:
    grid = get_grid(name)
    sens = torch.rand(128, generator=torch.Generator().manual_seed(4)) + 0.1
    gw = rtn(W, grid, sens)
    w_hat = gw.dequantize()
    back = roundtrip(gw)
    assert back.codes.dtype == gw.codes.dtype and torch.equal(back.codes, gw.codes)
    assert torch.equal(back.dequantize(), w_hat)
    # 128 columns pack into whole bytes at any code width: the bytes are the grid's accounting
    assert gw.storage_bytes() * 8 == pytest.approx(gw.bits_per_weight() * W.numel(), rel=1e-12)


def test_signed_codes_are_offset() -> None:
    for name, lo, hi in (("ternary", 0, 2), ("mxint8", 0, 254)):
        gw = rtn(W, get_grid(name))
        assert gw.codes.dtype == torch.int8
        stored = gw.to_tensors()["qweight"]
        u = unpack(stored, gw.grid.code_bits, W.shape[1])
        assert int(u.min()) >= lo and int(u.max()) <= hi
        assert torch.equal(u.to(torch.int16) - (hi // 2), gw.codes.to(torch.int16))


def test_inexact_compact_forms_fall_back_to_fp32() -> None:
    gw = rtn(W, get_grid("fp4-g32"))
    gw.params["scale"] = gw.params["scale"] * (1 + 2**-20)  # not an fp16 value any more
    assert gw.to_tensors()["scales"].dtype == torch.float32
    assert torch.equal(roundtrip(gw).dequantize(), gw.dequantize())
    gw = rtn(W, get_grid("nf4-dq"))
    assert "absmax" not in gw.to_tensors()  # rebuilt from its 8-bit codes
    gw.params["absmax"] = gw.params["absmax"] + 1e-3  # no longer what the 8-bit codes decode to
    assert "absmax" in gw.to_tensors()
    assert torch.equal(roundtrip(gw).dequantize(), gw.dequantize())


def check_reload(tmp_path, model, res, windows, name: str) -> None:
    out = save_quantized(tmp_path / "q", model, None, res.weights, {"method": "test"})
    back, _ = load_quantized(out)
    for layer, gw in res.weights.items():
        mod = back.get_submodule(layer)
        assert isinstance(mod, QLinear)
        assert torch.equal(mod.dequantized_weight(), gw.dequantize())
        live = model.get_submodule(layer)  # the model's own QLinear after quantize
        assert torch.equal(mod.dequantized_weight(), live.dequantized_weight())
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, back(input_ids=windows).logits)
    desc = json.loads((out / "lowbit.json").read_text())
    assert {d["grid"] for d in desc["layers"].values()} == {get_grid(name).name}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("name", GRID_NAMES)
def test_quantize_save_reload(tmp_path, windows, name: str, method: str) -> None:
    model = tiny_model("llama")
    res = lowbit.quantize(model, lowbit.shorthand(method, name), windows, progress=False)
    check_reload(tmp_path, model, res, windows, name)


@pytest.mark.parametrize("name", ["fp8-e4m3-b128", "nf4-dq-g128", "fp4-g128"])
def test_wide_blocks_on_hidden_128(tmp_path, windows, name: str) -> None:
    # fp8 blocks: 2 full row blocks and a partial one for gate/up (320 rows), a partial column
    # block for down_proj (320 columns); the others need intermediate sizes divisible by 128
    inter = 320 if name.startswith("fp8") else 256
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**(TINY | {"hidden_size": 128, "intermediate_size": inter,
                                    "num_hidden_layers": 1}))
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    res = lowbit.quantize(model, lowbit.shorthand("gptq", name), windows, progress=False)
    check_reload(tmp_path, model, res, windows, name)
