"""quantize_model with every grid scheme: log rows, bits per weight, and early errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lowbit.algorithms.gptq import GPTQConfig
from lowbit.api import (
    needs_calibration,
    preflight,
    quantize_model,
    resolve_scheme,
    scheme_dict,
)
from lowbit.errors import LowbitError
from lowbit.formats.grids import GRID_NAMES, get_grid
from lowbit.gridweight import GridWeight
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import Scheme

N_LINEARS = 14  # tiny llama: 2 blocks x 7 Linears


@pytest.mark.parametrize("name", GRID_NAMES)
def test_gptq_rows_and_bits(windows, name: str) -> None:
    model = tiny_model("llama")
    res = quantize_model(model, "gptq", name, windows, progress=False)
    grid = get_grid(name)
    assert len(res.rows) == len(res.qweights) == N_LINEARS
    for r in res.rows:
        assert r["loss"] <= r["rtn_loss"], r["name"]
        assert isinstance(r["saturated"], int) and r["saturated"] >= 0
        assert r["tokens"] == windows.numel()
    n, bits = 0, 0.0
    for q in res.qweights.values():
        assert isinstance(q, GridWeight)
        assert q.bits_per_weight() == grid.bits_per_weight(*q.shape)
        n += q.shape[0] * q.shape[1]
        bits += grid.bits_per_weight(*q.shape) * q.shape[0] * q.shape[1]
    assert res.bits_per_weight() == pytest.approx(bits / n, rel=1e-12)
    assert res.storage_bytes() * 8 == pytest.approx(bits, rel=1e-12)


@pytest.mark.parametrize("name", [n for n in GRID_NAMES if not n.startswith("sq")])
def test_rtn_needs_no_calibration(name: str) -> None:
    model = tiny_model("llama")
    res = quantize_model(model, "rtn", name, progress=False)
    assert len(res.qweights) == N_LINEARS
    assert all("loss" not in r and r["saturated"] >= 0 for r in res.rows)
    for layer, q in res.qweights.items():
        assert torch.equal(model.get_submodule(layer).weight.data, q.dequantize())


def test_squeezellm_rtn_uses_the_hessian_diagonal(windows) -> None:
    assert needs_calibration("rtn", "sq4") and not needs_calibration("rtn", "nf4")
    with pytest.raises(LowbitError, match="rtn sq4 needs calibration windows"):
        quantize_model(tiny_model("llama"), "rtn", "sq4", progress=False)
    res = quantize_model(tiny_model("llama"), "rtn", "sq3", windows, progress=False)
    assert len(res.qweights) == N_LINEARS and all(r["tokens"] > 0 for r in res.rows)


def test_integer_names_keep_the_integer_path(windows) -> None:
    assert isinstance(resolve_scheme("w4g64-asym"), Scheme)
    res = quantize_model(tiny_model("llama"), "gptq", "w4g32", windows, progress=False)
    assert all(isinstance(q, QuantizedWeight) for q in res.qweights.values())
    assert scheme_dict(res.scheme)["name"] == "w4g32"
    assert scheme_dict(resolve_scheme("mxfp4"))["name"] == "mxfp4"


def test_unknown_scheme_lists_known_names() -> None:
    with pytest.raises(LowbitError, match="unknown scheme 'foo4'") as e:
        quantize_model(tiny_model("llama"), "rtn", "foo4", progress=False)
    assert all(n in str(e.value) for n in GRID_NAMES) and "w4g64" in str(e.value)


def test_preflight_rejects_blocks_that_do_not_divide(windows) -> None:
    model = tiny_model("llama")
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    msg = "q_proj: nf4-g128: block 128 does not divide the input dimension 64.*32, 64"
    with pytest.raises(LowbitError, match=msg):
        preflight(model, "nf4-g128")
    with pytest.raises(LowbitError, match=msg):
        quantize_model(model, "gptq", "nf4-g128", windows, progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_act_order_is_for_integer_schemes(windows) -> None:
    with pytest.raises(LowbitError, match="act-order"):
        quantize_model(tiny_model("llama"), "gptq", "nf4", windows, GPTQConfig(act_order=True),
                       progress=False)
