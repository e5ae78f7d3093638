"""lowbit.quantize with every scheme, recipes with overrides and targets, lm_head, early
errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.grids import GRID_NAMES, get_grid
from lowbit.formats.integer import IntGrid
from lowbit.formats.weight import GridWeight
from lowbit.io.native import load_quantized

N_LINEARS = 14  # tiny llama: 2 blocks x 7 Linears


@pytest.mark.parametrize("name", GRID_NAMES)
def test_gptq_rows_and_bits(windows, name: str) -> None:
    model = tiny_model("llama")
    res = lowbit.quantize(model, [lowbit.GPTQ(scheme=name)], windows, progress=False)
    grid = get_grid(name)
    assert len(res.rows) == len(res.weights) == N_LINEARS
    for r in res.rows:
        assert r["loss"] <= r["rtn_loss"], r["name"]
        assert isinstance(r["saturated"], int) and r["saturated"] >= 0
        assert r["tokens"] == windows.numel() and r["scheme"] == name
    n, bits = 0, 0.0
    for q in res.weights.values():
        assert isinstance(q, GridWeight)
        assert q.bits_per_weight() == grid.bits_per_weight(*q.shape)
        n += q.shape[0] * q.shape[1]
        bits += grid.bits_per_weight(*q.shape) * q.shape[0] * q.shape[1]
    assert res.bits_per_weight() == pytest.approx(bits / n, rel=1e-12)
    assert res.storage_bytes() * 8 == pytest.approx(bits, rel=1e-12)


@pytest.mark.parametrize("name", [n for n in GRID_NAMES if not n.startswith("sq")])
def test_rtn_needs_no_calibration(name: str) -> None:
    model = tiny_model("llama")
    res = lowbit.quantize(model, [lowbit.RTN(scheme=name)], progress=False)
    assert len(res.weights) == N_LINEARS
    assert all("loss" not in r and r["saturated"] >= 0 for r in res.rows)
    for layer, q in res.weights.items():
        assert torch.equal(model.get_submodule(layer).dequantized_weight(), q.dequantize())


def test_squeezellm_rtn_uses_the_hessian_diagonal(windows) -> None:
    assert lowbit.RTN(scheme="sq4").needs_data() and not lowbit.RTN(scheme="nf4").needs_data()
    with pytest.raises(LowbitError, match="rtn needs calibration windows"):
        lowbit.quantize(tiny_model("llama"), [lowbit.RTN(scheme="sq4")], progress=False)
    res = lowbit.quantize(tiny_model("llama"), [lowbit.RTN(scheme="sq3")], windows,
                          progress=False)
    assert len(res.weights) == N_LINEARS and all(r["tokens"] > 0 for r in res.rows)


def test_integer_schemes_are_grids_with_act_order(windows) -> None:
    res = lowbit.quantize(tiny_model("llama"), [lowbit.GPTQ(scheme="w4g32")], windows,
                          progress=False)  # default: act-order with static groups
    assert all(isinstance(q.grid, IntGrid) and q.g_idx is None for q in res.weights.values())
    assert all(r["act_order"] == "static" for r in res.rows)
    res = lowbit.quantize(tiny_model("llama"), [lowbit.GPTQ(scheme="w4g32",
                                                            static_groups=False)],
                          windows, progress=False)
    assert all(isinstance(q.grid, IntGrid) and q.g_idx is not None
               for q in res.weights.values())
    res = lowbit.quantize(tiny_model("llama"), [lowbit.GPTQ(scheme="nf4")], windows,
                          progress=False)
    assert all(q.g_idx is None for q in res.weights.values())
    assert all(r["act_order"] == "off" for r in res.rows)
    res = lowbit.quantize(tiny_model("llama"), [lowbit.GPTQ(scheme="nf4", act_order=True)],
                          windows, progress=False)
    assert all(q.g_idx is None and r["act_order"] == "static"
               for q, r in zip(res.weights.values(), res.rows, strict=True))


def test_unknown_scheme_lists_known_names() -> None:
    with pytest.raises(LowbitError, match="unknown scheme 'foo4'") as e:
        lowbit.RTN(scheme="foo4")
    assert all(n in str(e.value) for n in GRID_NAMES) and "w4g64" in str(e.value)


def test_plan_rejects_blocks_that_do_not_divide(windows) -> None:
    model = tiny_model("llama")
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    msg = ("model.layers.0.self_attn.q_proj: nf4-g128: block 128 does not divide the input "
           "dimension 64.*32, 64")
    with pytest.raises(LowbitError, match=msg):
        lowbit.plan(model, [lowbit.GPTQ(scheme="nf4-g128")])
    with pytest.raises(LowbitError, match=msg):
        lowbit.quantize(model, [lowbit.GPTQ(scheme="nf4-g128")], windows, progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_overrides_give_mixed_precision(windows, tmp_path) -> None:
    """The issue's example: GPTQ w4g32, but lm_head and block 0's down_proj at 8 bits."""
    model = tiny_model("llama")
    gptq = lowbit.GPTQ(scheme="w4g32", ignore=[],
                       overrides={r"re:.*layers\.0\..*down_proj": "w8", "lm_head": "w8"})
    res = lowbit.quantize(model, [gptq], windows, progress=False)
    schemes = {n: w.grid.name for n, w in res.weights.items()}
    assert schemes.pop("model.layers.0.mlp.down_proj") == "w8"
    assert schemes.pop("lm_head") == "w8"
    assert set(schemes.values()) == {"w4g32"} and len(schemes) == N_LINEARS - 1
    # lm_head was tied to the embeddings: untied, the embeddings are unchanged
    assert not model.config.tie_word_embeddings
    emb = tiny_model("llama").get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.equal(model.lm_head.dequantized_weight(), res.weights["lm_head"].dequantize())
    lowbit.save(tmp_path / "q", model, None, res)
    back, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        a = model(input_ids=windows).logits
        b = back(input_ids=windows).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_targets_and_ignore(windows) -> None:
    model = tiny_model("llama")
    res = lowbit.quantize(model, [lowbit.RTN(scheme="w4g32", targets=["re:.*mlp"],
                                             ignore=["re:.*layers\\.1\\."])], progress=False)
    assert sorted(res.weights) == [f"model.layers.0.mlp.{n}"
                                   for n in ("down_proj", "gate_proj", "up_proj")]
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    with pytest.raises(LowbitError, match="targeted by rtn and gptq"):
        lowbit.plan(tiny_model("llama"), [lowbit.RTN(), lowbit.GPTQ()])
    steps = [lowbit.RTN(scheme="w8", targets=["re:.*down_proj"]),
             lowbit.GPTQ(scheme="w4g32", ignore=["re:.*down_proj", "lm_head"])]
    res = lowbit.quantize(tiny_model("llama"), steps, windows, progress=False)
    assert {r["step"] for r in res.rows if "down_proj" in r["name"]} == {"rtn"}
    assert {r["step"] for r in res.rows if "down_proj" not in r["name"]} == {"gptq"}
    with pytest.raises(LowbitError, match="bad regular expression"):
        lowbit.RTN(targets=["re:(unclosed"])


def test_hqq_rounds_without_data_and_refuses_other_grids() -> None:
    res = lowbit.quantize(tiny_model("llama"), [lowbit.HQQ(scheme="w4g32-asym")],
                          progress=False)
    assert len(res.weights) == N_LINEARS
    assert all(w.grid.name == "w4g32-asym" for w in res.weights.values())
    with pytest.raises(LowbitError, match="hqq fits integer schemes"):
        lowbit.HQQ(scheme="nf4")
