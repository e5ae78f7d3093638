"""QLinear, the runtime Linear of every grid weight: forward against F.linear with the
dequantized weight, stored tensors as buffers through state_dict, accounting, build_module."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.grids import get_grid
from lowbit.formats.integer import IntGrid
from lowbit.formats.weight import GridWeight
from lowbit.methods.gptq import gptq_quantize, prepare_hessian
from lowbit.methods.rtn import rtn
from lowbit.runtime.modules import build_module
from lowbit.runtime.qlinear import QLinear

OUT, IN = 200, 320  # FP8 128x128 blocks partial in both dimensions
NAMES = ["w4g32", "w3g64-asym", "w8-tensor", "nf4", "nf4-dq", "fp4-g32", "mxfp4", "mxint8",
         "nvfp4", "fp8-e4m3-b128", "fp8-e5m2", "sq3", "ternary", "g_idx"]


def weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed)) * 0.02


def grid_weight(name: str, seed: int = 0) -> GridWeight:
    if name == "g_idx":  # act-order GPTQ: columns grouped in rounding order
        g = torch.Generator().manual_seed(9)
        x = torch.randn(1024, IN, generator=g) * torch.rand(IN, generator=g)
        gw = gptq_quantize(weight(seed), prepare_hessian(2 * x.T @ x / 1024, act_order=True),
                           get_grid("w4g32"))
        assert gw.g_idx is not None
        return gw
    return rtn(weight(seed), get_grid(name), torch.rand(IN) + 0.1)


def inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_linear_with_the_dequantized_weight(name: str) -> None:
    gw = grid_weight(name)
    bias = torch.randn(OUT, generator=torch.Generator().manual_seed(2))
    q = QLinear(gw, bias)
    w_hat = gw.dequantize()
    assert torch.equal(q.dequantized_weight(), w_hat)
    x = inputs()
    assert torch.equal(q(x), F.linear(x, w_hat, bias))
    assert torch.equal(QLinear(gw)(x), F.linear(x, w_hat))
    # the arithmetic follows the input's dtype
    xb = inputs(torch.bfloat16)
    y = q(xb)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(xb, w_hat.to(torch.bfloat16), bias.to(torch.bfloat16)))


@pytest.mark.parametrize("name", NAMES)
def test_buffers_round_trip_through_state_dict(name: str) -> None:
    gw = grid_weight(name)
    bias = torch.randn(OUT)
    q = QLinear(gw, bias)
    sd = q.state_dict()
    assert set(sd) == set(gw.to_tensors()) | {"bias"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    # a QLinear of another weight on the same grid takes the saved buffers
    other = QLinear(grid_weight(name, seed=5), torch.zeros(OUT))
    assert not torch.equal(other.dequantized_weight(), gw.dequantize())
    other.load_state_dict(torch.load(buf))
    for k, v in sd.items():
        assert other.state_dict()[k].dtype == v.dtype and torch.equal(other.state_dict()[k], v)
    assert torch.equal(other.dequantized_weight(), gw.dequantize())
    x = inputs()
    assert torch.equal(other(x), q(x))
    back = other.grid_weight()
    assert torch.equal(back.codes, gw.codes) and (back.g_idx is None) == (gw.g_idx is None)


@pytest.mark.parametrize("name", ["w4g32", "nf4", "g_idx", "ternary"])
def test_accounting_and_build_module(name: str) -> None:
    gw = grid_weight(name)
    q = QLinear(gw)
    assert q.shape == gw.shape == (OUT, IN)
    assert q.bits_per_weight() == gw.bits_per_weight()
    assert q.storage_bytes() == gw.storage_bytes()
    grid = "w4g32" if name == "g_idx" else name
    assert q.layer_info() == {"shape": [OUT, IN], "grid": grid}
    assert f"grid={grid}" in repr(q)
    # a saved layer's record and tensors rebuild the same module
    rebuilt = build_module(q.layer_info(), q.to_tensors(), None)
    assert isinstance(rebuilt, QLinear) and rebuilt.grid == q.grid
    assert torch.equal(rebuilt.dequantized_weight(), q.dequantized_weight())


def test_fp32_scales_are_recorded() -> None:
    grid = IntGrid(4, "group", 32, scale_dtype="float32")
    gw = rtn(weight(), grid)
    q = QLinear(gw)
    assert q.to_tensors()["scales"].dtype == torch.float32
    assert q.layer_info() == {"shape": [OUT, IN], "grid": "w4g32", "scale_dtype": "float32"}
    rebuilt = build_module(q.layer_info(), q.to_tensors(), None)
    assert rebuilt.grid == grid and torch.equal(rebuilt.dequantized_weight(), gw.dequantize())


def test_cache_decodes_once() -> None:
    gw = grid_weight("nf4")
    cached, plain = QLinear(gw, cache=True), QLinear(gw)
    assert cached.dequantized_weight() is cached.dequantized_weight()
    assert plain.dequantized_weight() is not plain.dequantized_weight()
    assert torch.equal(cached.dequantized_weight(), plain.dequantized_weight())


def test_in_a_model() -> None:
    """A QLinear in place of an nn.Linear: the model's state_dict carries its buffers."""
    gw = grid_weight("mxfp4")
    model = nn.Sequential(nn.LayerNorm(IN), QLinear(gw, torch.randn(OUT)), nn.ReLU())
    fresh = nn.Sequential(nn.LayerNorm(IN), QLinear(grid_weight("mxfp4", seed=3),
                                                    torch.zeros(OUT)), nn.ReLU())
    fresh.load_state_dict(model.state_dict())
    x = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert not any(p.requires_grad for p in model[1].parameters())


def test_cache_follows_loaded_buffers() -> None:
    q = QLinear(grid_weight("w4g32"), cache=True)
    q.dequantized_weight()
    other = grid_weight("w4g32", seed=5)
    q.load_state_dict(QLinear(other).state_dict())
    assert torch.equal(q.dequantized_weight(), other.dequantize())


@pytest.mark.parametrize("name", ["w4g32", "nf4"])
def test_dtype_cast_keeps_the_stored_weight(name: str) -> None:
    gw = grid_weight(name)
    q = QLinear(gw).to(torch.bfloat16)
    assert torch.equal(q.dequantized_weight(), gw.dequantize())
