"""Int8 kernels, W8A8Linear and Int8MixedLinear against independent references."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.runtime.int8 import Int8Weight, pick_kernel, quantize_weight_int8
from lowbit.runtime.int8_mixed import Int8MixedLinear
from lowbit.runtime.w8a8 import W8A8Linear


def _codes(shape, lim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-lim, lim + 1, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("kernel", ["onednn", "int_mm", "emulate"])
@pytest.mark.parametrize("rows", [3, 40])
def test_kernels_exact_integer_product(kernel, rows):
    wq = _codes((24, 64), 64, 1)
    xq = _codes((rows, 64), 127, 2)
    acc = Int8Weight(wq, kernel).matmul(xq)
    ref = xq.long() @ wq.long().T  # exact integers
    assert torch.equal(acc.long(), ref)


def test_onednn_refuses_codes_it_would_saturate():
    wq = _codes((8, 64), 127, 3)
    wq[0, 0] = 100
    with pytest.raises(LowbitError, match="64"):
        Int8Weight(wq, "onednn")
    assert pick_kernel("auto", wq) == "int_mm"
    assert pick_kernel("auto", wq.clamp(-64, 64)) == "onednn"
    with pytest.raises(LowbitError, match="unknown int8 kernel"):
        pick_kernel("fast", wq)


def test_weight_quantization_per_channel():
    w = torch.randn(5, 16)
    q, s = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.allclose(s, w.abs().amax(1) / 127)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6
    q7, _ = quantize_weight_int8(w, 64)
    assert int(q7.abs().max()) == 64


def _ref_dynamic(x, w, b, wmax):
    """Hand-written W8A8 reference: per-token int8 activations, per-channel weights."""
    sw = w.abs().max(dim=1).values / wmax
    wq = torch.clamp(torch.round(w / sw[:, None]), -wmax, wmax)
    sx = x.abs().max(dim=1).values / 127
    xq = torch.clamp(torch.round(x / sx[:, None]), -127, 127)
    return (xq.double() @ wq.double().T) * sx[:, None].double() * sw[None, :].double() + b


@pytest.mark.parametrize("kernel,wmax", [("onednn", 64), ("int_mm", 127), ("auto", 64)])
def test_w8a8_dynamic_matches_reference_and_simulation(kernel, wmax):
    torch.manual_seed(0)
    w, b = torch.randn(48, 64), torch.randn(48)
    x = torch.randn(2, 20, 64)
    x[..., 5] *= 30  # an outlier channel
    m = W8A8Linear.from_linear(w, b, weight_qmax=wmax, kernel=kernel)
    y = m(x)
    ref = _ref_dynamic(x.reshape(-1, 64), w, b, wmax).reshape(2, 20, 48)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(y, m.simulate(x), rtol=1e-5, atol=1e-4)
    # and it is a quantized product, not the fp32 Linear
    assert (y - torch.nn.functional.linear(x, w, b)).abs().max() > 1e-3


def test_w8a8_static_clips_beyond_calibrated_range():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    m = W8A8Linear.from_linear(w, None, act="static", x_absmax=2.0, kernel="int_mm")
    x = torch.randn(20, 32)
    x[0, 0] = 50.0  # far outside the calibrated range: clipped to 2.0
    sx = 2.0 / 127
    xq = torch.clamp(torch.round(x / sx), -127, 127)
    sw = w.abs().amax(1) / 127
    wq = torch.round(w / sw[:, None])
    ref = (xq @ wq.T) * sx * sw[None, :]
    assert torch.allclose(m(x), ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(m(x), m.simulate(x), rtol=1e-5, atol=1e-4)
    with pytest.raises(LowbitError, match="calibrated scale"):
        W8A8Linear(wq.to(torch.int8), sw, act="static")


def test_llm_int8_decomposition():
    torch.manual_seed(2)
    w, b = torch.randn(24, 32), torch.randn(24)
    x = torch.randn(30, 32)
    x[3, 7] = 9.0
    x[10, 20] = -12.0
    m = Int8MixedLinear.from_linear(w, b, threshold=6.0, kernel="int_mm")
    y = m(x)
    # reference: columns 7 and 20 in fp32 (dequantized int8 weight), the rest int8 vector-wise
    sw = w.abs().amax(1) / 127
    wd = torch.round(w / sw[:, None]) * sw[:, None]
    out = torch.zeros(32, dtype=torch.bool)
    out[[7, 20]] = True
    rest = x.clone()
    rest[:, out] = 0
    sx = rest.abs().amax(1) / 127
    xd = torch.round(rest / sx[:, None]) * sx[:, None]
    ref = xd @ wd.T + x[:, out] @ wd[:, out].T + b
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
    assert m.calls == 1 and m.outlier_cols == 2
    assert m.outlier_fraction == pytest.approx(2 / 32)
    # without outliers it is the plain vector-wise int8 product
    big = Int8MixedLinear.from_linear(w, b, threshold=1e9, kernel="emulate")
    assert big(x).sub(ref).abs().max() > 1e-3 and big.outlier_cols == 0
    # with every column an outlier, the activations stay in full precision
    tiny = Int8MixedLinear.from_linear(w, b, threshold=1e-9, kernel="emulate")
    assert torch.allclose(tiny(x), x @ wd.T + b, rtol=1e-5, atol=1e-4)
    with pytest.raises(LowbitError, match="threshold"):
        Int8MixedLinear.from_linear(w, b, threshold=0.0)


@pytest.mark.parametrize("kind", ["w8a8", "w8a8-static", "llm-int8"])
def test_module_accounting(kind):
    """The shared runtime-module interface: shape, dequantized weight, stored bytes, and the
    layer record a saved model keeps."""
    torch.manual_seed(3)
    w, b = torch.randn(24, 32), torch.randn(24)
    if kind == "llm-int8":
        m = Int8MixedLinear.from_linear(w, b, threshold=6.0, kernel="emulate")
        stored = {"qweight", "w_scale"}
        info = {"kind": "llm-int8", "shape": [24, 32], "threshold": 6.0, "kernel": "emulate"}
    else:
        act = "static" if kind.endswith("static") else "dynamic"
        m = W8A8Linear.from_linear(w, b, act=act, x_absmax=3.0, kernel="emulate")
        stored = {"qweight", "w_scale", "x_scale"}
        info = {"kind": "w8a8", "shape": [24, 32], "act": act, "kernel": "emulate"}
    q, s = quantize_weight_int8(w)
    assert m.shape == (24, 32)
    assert torch.equal(m.dequantized_weight(), q.float() * s[:, None])
    assert set(m.to_tensors()) == stored
    assert m.storage_bytes() == 24 * 32 + 4 * 24 + 4 * ("x_scale" in stored)
    assert m.bits_per_weight() == 8 * m.storage_bytes() / (24 * 32)
    assert m.layer_info() == info
