"""Fake quantization for training, against the definitions: the forward value is what RTN
stores on every grid, the STE gradient is 1 inside the clip range and 0 outside, LSQ's scale
gradient is ``round(w/s) - w/s`` inside and the clipped level outside, times
``1/sqrt(n * qmax)``, and learned offsets stay in [-0.5, 0.5] and beat round-to-nearest."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats.grids import get_grid
from lowbit.formats.integer import quantize_activations
from lowbit.methods.fakequant import (
    clamp_offsets,
    fake_quant,
    fake_quant_activations,
    lsq_int,
)
from lowbit.methods.rtn import rtn


def weight(rows=16, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g) * 0.1


def fitted(w, grid):
    return grid.finalize(grid.fit_all(w, None, grid.prepare(w)))


@pytest.mark.parametrize("name", ["w4g32", "w3g32-asym", "nf4", "fp4", "nvfp4", "mxfp4"])
def test_forward_is_what_rtn_stores(name):
    grid = get_grid(name)
    w = weight()
    got = fake_quant(w.clone().requires_grad_(), grid, fitted(w, grid))
    torch.testing.assert_close(got.detach(), rtn(w, grid).dequantize(), rtol=0, atol=0)


def test_ste_gradient_is_one_inside_the_range_and_zero_outside():
    grid = get_grid("w4g32")  # symmetric: codes 0..15 around the zero point 8
    w = weight()
    params = fitted(w, grid)
    params = {**params, "scale": params["scale"] * 0.6}  # a narrower range: some entries clip
    x = w.clone().requires_grad_()
    fake_quant(x, grid, params).sum().backward()
    v = w.reshape(16, 2, 32) / params["scale"].unsqueeze(-1) + 8
    inside = ((v >= -0.5) & (v <= 15.5)).reshape(w.shape).float()
    assert 0 < int((inside == 0).sum()) < w.numel() // 2  # the test has both kinds
    torch.testing.assert_close(x.grad, inside, rtol=0, atol=0)


def test_lsq_scale_gradient_and_its_scaling():
    bits, gs = 3, 32
    w = weight()
    grid = get_grid("w3g32-asym")
    p = fitted(w, grid)
    scale = (p["scale"] * 0.8).clone().requires_grad_()  # some entries clip
    zero = p["zero"]
    out = lsq_int(w, scale, zero, bits, gs)
    want = grid.decode(grid.encode(w.reshape(16, 2, 32), {"scale": scale.detach()[..., None],
                                                          "zero": zero[..., None]}),
                       {"scale": scale.detach()[..., None], "zero": zero[..., None]})
    torch.testing.assert_close(out.detach(), want.reshape(w.shape), rtol=0, atol=1e-6)
    out.sum().backward()
    s = scale.detach()[..., None]
    v = w.reshape(16, 2, 32) / s
    q = torch.round(v) + zero[..., None]
    per = torch.where(q < 0, -zero[..., None], torch.where(q > 7, 7 - zero[..., None],
                                                            torch.round(v) - v))
    g = 1 / math.sqrt(gs * (2**bits - 1))
    torch.testing.assert_close(scale.grad, per.sum(-1) * g, rtol=1e-5, atol=1e-6)


def test_learned_offsets_stay_in_bounds_and_beat_round_to_nearest():
    """AdaRound/AutoRound in miniature: offsets learned on a layer's correlated inputs reduce
    the output error of 3-bit rounding below RTN's (the best state seen is kept, as AutoRound
    keeps it: straight-through steps overshoot once many weights flip together). With
    uncorrelated inputs RTN would already be optimal (the error separates per weight)."""
    g = torch.Generator().manual_seed(1)
    w = weight(rows=32, cols=64, seed=2)
    x = torch.randn(256, 64, generator=g) @ (torch.eye(64) + 0.5 * torch.randn(64, 64,
                                                                               generator=g))
    grid = get_grid("w3g32")
    p = fitted(w, grid)
    v = torch.zeros(32, 2, 32, requires_grad=True)
    opt = torch.optim.Adam([v], lr=1e-3)

    def loss():
        return ((x @ (lsq_int(w, p["scale"], p["zero"], 3, 32, v) - w).T) ** 2).mean()

    with torch.no_grad():
        start = float(loss())
        assert start == pytest.approx(float(((x @ (rtn(w, grid).dequantize() - w).T) ** 2)
                                            .mean()))
    best = start
    for _ in range(300):
        opt.zero_grad()
        value = loss()
        value.backward()
        best = min(best, float(value.detach()))
        opt.step()
        clamp_offsets(v)
        assert float(v.detach().abs().max()) <= 0.5
    assert best < 0.85 * start  # measured: 0.75x


def test_activations_per_token_pass_the_gradient():
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    y = fake_quant_activations(x, 8)
    torch.testing.assert_close(y.detach(), quantize_activations(x.detach(), 8), rtol=0,
                               atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
