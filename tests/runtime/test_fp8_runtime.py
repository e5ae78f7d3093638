"""FP8 W8A8 runtime against independent references: ml_dtypes' float8 types, an fp32 product
of the decoded values, and hand-worked delayed-scaling steps."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.native import load_quantized
from lowbit.methods.w8a8 import W8A8
from lowbit.runtime.fp8 import (
    DelayedScaling,
    FP8Linear,
    fp8_matmul,
    quantize_rows_fp8,
    to_fp8,
)


@pytest.mark.parametrize(("fmt", "np_type"), [("e4m3", ml_dtypes.float8_e4m3fn),
                                               ("e5m2", ml_dtypes.float8_e5m2)])
def test_encoding_matches_ml_dtypes(fmt, np_type):
    """Every value rounds as ml_dtypes rounds it (nearest even), after saturation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-6, 5, 4096)
    top = float(ml_dtypes.finfo(np_type).max)
    got = to_fp8(x, 1.0, fmt).float().numpy()
    want = np.clip(x.numpy(), -top, top).astype(np_type).astype(np.float32)
    assert np.array_equal(got, want)


def test_row_scales_map_absmax_to_the_largest_value():
    w = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0], [448.0, 1.0, -3.0]])
    q, s = quantize_rows_fp8(w)
    assert torch.equal(s, torch.tensor([2.0 / 448, 1.0, 1.0]))
    assert q.float()[0, 1] == -448 and q.float()[2, 0] == 448
    assert torch.equal(q.float()[1], torch.zeros(3))
    with pytest.raises(LowbitError, match="non-finite"):
        quantize_rows_fp8(torch.tensor([[1.0, float("nan")]]))


def test_delayed_scaling_uses_the_history_before_the_call():
    """Transformer Engine's recipe by hand: scale 1 with no history; then max(history) *
    2**margin / 448; the history keeps the last ``history_len`` amax values."""
    d = DelayedScaling("e4m3", history_len=2, margin=1)
    assert d.scale() == 1.0
    d.record(224.0)
    assert d.scale() == 224.0 * 2 / 448
    d.record(896.0)
    d.record(112.0)  # 224 drops out of a history of 2
    assert d.history == [896.0, 112.0]
    assert d.scale() == 896.0 * 2 / 448
    with pytest.raises(LowbitError):
        DelayedScaling(history_len=0)


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_linear_equals_the_product_of_decoded_values(act):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    x = torch.randn(2, 5, 64, generator=g) * 3
    lin = FP8Linear.from_linear(w, b, act)
    if act == "static":
        lin.start_calibration()
        lin(x)  # first call: no history, scale 1
        lin(x)
        lin.finish_calibration()
        assert float(lin.x_scale) == pytest.approx(float(x.abs().max()) / 448)
    y = lin(x)
    x2 = x.reshape(-1, 64)
    if act == "dynamic":
        sx = x2.abs().amax(1, keepdim=True) / 448
    else:
        sx = lin.x_scale.reshape(1, 1)
    xd = (x2 / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float() * sx
    wd = lin.qweight.float() * lin.w_scale[:, None]
    ref = (xd @ wd.T + b).reshape(2, 5, 48)
    # the kernel may sum in any order: allow fp32 rounding of the sum of |terms| per output
    bound = (xd.abs() @ wd.abs().T + b.abs()).reshape(2, 5, 48) * 64 * 2.0**-24
    assert ((y - ref).abs() <= bound + 1e-7).all()
    exact = torch.nn.functional.linear(x, w, b)
    assert 0 < float((y - exact).norm() / exact.norm()) < 0.06  # 3 mantissa bits: a few %


def test_scaled_mm_and_emulation_agree():
    g = torch.Generator().manual_seed(2)
    a, sa = quantize_rows_fp8(torch.randn(33, 96, generator=g))
    b, sb = quantize_rows_fp8(torch.randn(40, 96, generator=g))
    real = fp8_matmul(a, b, sa[:, None], sb[None, :], "scaled_mm")
    emu = fp8_matmul(a, b, sa[:, None], sb[None, :], "emulate")
    # both sum the same products in fp32, in an order the kernel chooses
    tol = 1e-5 * float(emu.abs().max())
    assert torch.allclose(real, emu, rtol=1e-5, atol=tol)
    scalar = fp8_matmul(a, b, torch.tensor(0.5), sb[None, :], "scaled_mm")
    assert torch.allclose(scalar, fp8_matmul(a, b, torch.tensor(0.5), sb[None, :], "emulate"),
                          rtol=1e-5, atol=tol)
    with pytest.raises(LowbitError, match="kernel"):
        fp8_matmul(a, b, sa[:, None], sb[None, :], "fast")


def test_static_scale_required_and_saturation_counted():
    lin = FP8Linear.from_linear(torch.randn(8, 16), act="static")
    with pytest.raises(LowbitError, match="calibrated"):
        lin(torch.randn(2, 16))
    lin.x_scale.fill_(1.0 / 448)  # covers |x| <= 1
    lin(torch.tensor([[2.0] + [0.0] * 15, [-0.5] * 16]))
    assert lin.saturated == 1


@pytest.mark.parametrize("scheme", ["w8a8-fp8", "w8a8-fp8-static"])
def test_model_quantizes_saves_and_reloads(tmp_path, scheme):
    model = tiny_model("llama")
    calib = torch.randint(0, model.config.vocab_size, (4, 16))
    with torch.no_grad():
        ref = model(input_ids=calib[:1]).logits
    res = lowbit.quantize(model, [W8A8(scheme=scheme)], calib, chunk=2, progress=False)
    assert len(res.weights) == 14  # 2 blocks x 7 Linears; lm_head is ignored by default
    assert all(isinstance(m, FP8Linear) for m in res.weights.values())
    assert all(model.get_submodule(n) is m for n, m in res.weights.items())
    assert len(res.rows) == 14 and all(r["step"] == "w8a8" for r in res.rows)
    if scheme.endswith("static"):
        # clipped during calibration (delayed scaling lags the amax), counted, then reset
        assert all(r["x_scale"] > 0 and isinstance(r["saturated"], int) for r in res.rows)
        assert all(m.delayed is None and m.saturated == 0 for m in res.weights.values())
        assert [r["x_scale"] for r in res.rows] == [
            float(res.weights[r["name"]].x_scale) for r in res.rows]
    with torch.no_grad():
        got = model(input_ids=calib[:1]).logits
    assert not torch.equal(got, ref) and torch.allclose(got, ref, atol=0.1)
    out = lowbit.save(tmp_path / "q", model, None, res)
    back, _ = load_quantized(out)
    for name, m in res.weights.items():
        m2 = back.get_submodule(name)
        assert isinstance(m2, FP8Linear) and (m2.act, m2.kernel) == (m.act, m.kernel)
        assert m2.qweight.dtype == torch.float8_e4m3fn
        assert torch.equal(m2.qweight.view(torch.uint8), m.qweight.view(torch.uint8))
        assert torch.equal(m2.w_scale, m.w_scale)
        assert torch.equal(m2.x_scale, m.x_scale)
    with torch.no_grad():
        assert torch.equal(back(input_ids=calib[:1]).logits, got)


def test_static_needs_calibration():
    assert W8A8(scheme="w8a8-fp8-static").needs_data() and not W8A8(scheme="w8a8-fp8").needs_data()
    with pytest.raises(LowbitError, match="w8a8 needs calibration windows"):
        lowbit.quantize(tiny_model("llama"), [W8A8(scheme="w8a8-fp8-static")], None,
                        progress=False)
    with pytest.raises(LowbitError, match="kernel must be one of auto, scaled_mm, emulate"):
        W8A8(scheme="w8a8-fp8", kernel="onednn")


def test_module_accounting():
    """The shared runtime-module interface: shape, dequantized weight, stored bytes."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g)
    lin = FP8Linear.from_linear(w, act="dynamic")
    assert lin.shape == (48, 64)
    q, s = quantize_rows_fp8(w)
    assert torch.equal(lin.dequantized_weight(), q.float() * s[:, None])
    assert set(lin.to_tensors()) == {"qweight", "w_scale", "x_scale"}
    assert lin.storage_bytes() == 48 * 64 + 4 * 48 + 4
    assert lin.bits_per_weight() == 8 * lin.storage_bytes() / (48 * 64)
    assert lin.layer_info() == {"kind": "w8a8-fp8", "shape": [48, 64], "act": "dynamic",
                                "fmt": "e4m3", "kernel": "scaled_mm"}


def test_serving_export_takes_fp8_activations_not_e5m2():
    """FP8 W8A8 modules are serving weights (compressed-tensors float-quantized; the round trip
    is tested in tests/io/serving/test_ct_int8.py); E5M2 has no compressed-tensors scheme."""
    from lowbit.io.serving.checkpoint import quantized_weights
    from lowbit.io.serving.compressed_tensors import layer_tensors

    model = tiny_model("llama")
    lowbit.quantize(model, [W8A8(scheme="w8a8-fp8")], None, progress=False)
    qw = quantized_weights(model)
    assert qw and all(isinstance(m, FP8Linear) for m in qw.values())
    name, mod = next(iter(qw.items()))
    mod.fmt = "e5m2"
    with pytest.raises(LowbitError, match="E4M3 only"):
        layer_tensors(name, mod)
