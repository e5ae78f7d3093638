"""Integer weight grids that also round activations per token (w4g64a8, w4a4): the rounding
against a worked example, the names, the Linear's product against the emulation's definition,
and the command line (native only: the serving formats say why they cannot hold it)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import lowbit_cli, one_line_error

from lowbit.errors import LowbitError
from lowbit.formats.grids import get_grid, grid_from_info, grid_info
from lowbit.formats.integer import quantize_activations
from lowbit.methods.rtn import rtn
from lowbit.runtime.kernels import kernel_for
from lowbit.runtime.qlinear import QLinear


def test_activations_round_per_token_to_symmetric_integers():
    # 4 bits: levels -7..7 in steps of max|x| / 7 = 1 here; -3.5 rounds half to even: -4
    x = torch.tensor([[7.0, -3.5, 1.6, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.5, 0.1]])
    q = quantize_activations(x, 4)
    assert torch.equal(q[0], torch.tensor([7.0, -4.0, 2.0, 0.0]))
    assert torch.equal(q[1], x[1])  # a zero row stays zero
    steps = q[2] / (2 / 7)
    torch.testing.assert_close(steps, torch.tensor([-7.0, 3.0, 2.0, 0.0]))
    q8 = quantize_activations(x, 8)
    half_step = x.abs().amax(-1, keepdim=True) / 127 / 2  # per row
    assert bool(((q8 - x).abs() <= half_step * (1 + 1e-6)).all())


@pytest.mark.parametrize("name", ["w4g64a8", "w4a8", "w4a4", "w3g64a8-asym", "w2g32a8-mse"])
def test_names_round_trip(name):
    g = get_grid(name)
    assert g.name == name and g.act_bits == int(name.split("a")[1][0])
    assert grid_from_info(grid_info(g)) == g


def test_eight_bit_weights_with_activations_are_the_w8a8_method():
    with pytest.raises(LowbitError, match="--method w8a8"):
        get_grid("w8g64a8")
    with pytest.raises(LowbitError, match="2..8 bits"):
        get_grid("w4a1")


@pytest.mark.parametrize("name", ["w4g64a8", "w4a4"])
def test_the_product_is_the_rounded_input_times_the_decoded_weight(name):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g) * 0.05
    q = QLinear(rtn(w, get_grid(name), None), torch.randn(32, generator=g))
    assert kernel_for(q.grid, q.shape) == "lut4" and q.use_kernel("auto-a8") == "lut4"
    for rows in (1, 40):  # through lut4, and through the decoded weight
        x = torch.randn(rows, 128, generator=g) * 3
        ref = F.linear(quantize_activations(x, q.grid.act_bits), q.dequantized_weight(), q.bias)
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
        plain = F.linear(x, q.dequantized_weight(), q.bias)
        assert float((q(x) - plain).abs().max()) > 1e-3  # the rounding is really there


def test_act_schemes_save_natively_and_serving_formats_say_why_not(tiny_ckpt, tmp_path):
    from lowbit.models import load_model

    ckpt, text = tiny_ckpt
    out = tmp_path / "q"
    r = lowbit_cli("quantize", ckpt, "--rotate", "--method", "rtn", "--scheme", "w4g32a8",
                   "--out", out, "--quiet")
    assert "rounds activations" in r.err and "native" in r.err
    desc = json.loads((out / "lowbit.json").read_text())
    assert desc["format"] != "compressed-tensors"
    model, _ = load_model(out)
    assert model.model.layers[0].mlp.down_proj.grid.name == "w4g32a8"
    r = lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32a8", "--format",
                   "compressed-tensors", "--out", tmp_path / "ct", ok=False)
    one_line_error(r, "rounds activations at run time")
