"""Weight-only kernels against the dequantized reference: which grids each takes, exact weights
where the kernel's arithmetic allows (an identity input reads the weight back), fp32-rounding
agreement otherwise, act-order, bf16, and the choice over a whole model."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.grids import get_grid
from lowbit.methods.gptq import gptq_quantize, prepare_hessian
from lowbit.methods.rtn import rtn
from lowbit.runtime.kernels import check_kernel, kernel_for, prepare_kernels
from lowbit.runtime.qlinear import QLinear

EXPECTED = {
    "w4g32": "int4pack", "w4g64": "int4pack", "w4g128-asym": "int4pack",
    "w4g256": "int4pack", "w8": "int8pack", "w8-asym": "int8pack", "w8-tensor": "int8pack",
    "w4g16": "dequant", "w4": "dequant", "w3g64": "dequant", "w8g64": "dequant",
    "nf4": "dequant", "fp4-g32": "dequant", "mxfp4": "dequant", "nvfp4": "dequant",
}


def layer(name: str, rows: int = 64, cols: int = 512, bias: bool = True) -> QLinear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) * 0.02
    b = torch.randn(rows, generator=g) if bias else None
    return QLinear(rtn(w, get_grid(name)), b)


@pytest.mark.parametrize("name", EXPECTED)
def test_auto_picks_the_kernel_that_takes_the_grid(name):
    assert kernel_for(get_grid(name), (64, 512)) == EXPECTED[name]
    q = layer(name)
    assert q.use_kernel("auto") == EXPECTED[name] == q.kernel


def test_int4pack_needs_rows_in_sixteens_and_a_dividing_group():
    assert kernel_for(get_grid("w4g64"), (72, 512)) == "dequant"
    assert kernel_for(get_grid("w4g128"), (64, 192)) == "dequant"  # 128 does not divide 192
    with pytest.raises(LowbitError, match="int4pack kernel cannot multiply a nf4 weight"):
        check_kernel("int4pack", get_grid("nf4"), (64, 512))
    with pytest.raises(LowbitError, match="unknown kernel 'marlin'"):
        check_kernel("marlin", get_grid("w4g64"), (64, 512))


@pytest.mark.parametrize("name", [n for n, k in EXPECTED.items() if k != "dequant"])
def test_kernels_read_back_the_decoded_weight(name):
    """x = I gives W^T: one product per output, so the kernel's weights are seen exactly
    (symmetric grids: bit for bit; zero points: to the last bit of (q-8)s + (8-z)s)."""
    q = layer(name, bias=False)
    ref = q.dequantized_weight()
    q.use_kernel("auto")
    got = q.built_kernel()(torch.eye(512)).T  # the kernel itself (512 rows go densely)
    if "asym" in name:
        torch.testing.assert_close(got, ref, rtol=2e-7, atol=1e-9)
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("name", [n for n, k in EXPECTED.items() if k != "dequant"])
def test_kernels_equal_the_reference_to_fp32_rounding(name):
    q = layer(name)
    x = torch.randn(2, 7, 512, generator=torch.Generator().manual_seed(1))
    ref = q(x)
    q.use_kernel(EXPECTED[name])  # named: used for fp32 activations too
    y = q(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    yb = q(x.bfloat16())  # bf16 activations stay bf16 through the kernel
    assert yb.dtype == torch.bfloat16
    assert float((yb.float() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


def test_act_order_groups_are_gathered_back():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g) * 0.02
    x = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3, 256)
    hes = prepare_hessian(2 * x.T @ x / 512, act_order=True, damp=0.01)
    gw = gptq_quantize(w, hes, get_grid("w4g64"), 128, static_groups=False)
    assert gw.g_idx is not None and not torch.equal(gw.g_idx, torch.arange(256) // 64)
    q = QLinear(gw)
    ref = q(x[:5])
    assert q.use_kernel("int4pack") == "int4pack"
    torch.testing.assert_close(q(x[:5]), ref, rtol=1e-5, atol=1e-5)


def test_prepare_kernels_counts_the_model_and_dequant_undoes_it():
    model = torch.nn.Sequential(layer("w4g64"), torch.nn.ReLU(), layer("nf4", 512, 64),
                                layer("w8", 64, 512))
    x = torch.randn(3, 512)
    ref = model(x)
    assert prepare_kernels(model, "auto") == {"int4pack": 1, "dequant": 1, "int8pack": 1}
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert prepare_kernels(model, "dequant") == {"dequant": 3}
    assert torch.equal(model(x), ref)


def test_many_rows_go_through_the_decoded_weight():
    """A prompt or an evaluation window (more than KERNEL_MAX_ROWS rows) is multiplied densely
    (bit for bit the reference); a decode step through the kernel."""
    from lowbit.runtime.qlinear import KERNEL_MAX_ROWS

    q = layer("w4g64-asym")
    x = torch.randn(KERNEL_MAX_ROWS + 1, 512)
    ref = q(x)
    q.use_kernel("int4pack")
    assert torch.equal(q(x), ref)
    assert not torch.equal(q(x[:KERNEL_MAX_ROWS]), ref[:KERNEL_MAX_ROWS])  # the kernel's sums
    torch.testing.assert_close(q(x[:KERNEL_MAX_ROWS]), ref[:KERNEL_MAX_ROWS])


class Counting:
    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, 0
        self.name, self.fast_dtypes = kernel.name, kernel.fast_dtypes

    def __call__(self, x):
        self.calls += 1
        return self.kernel(x)


@pytest.mark.parametrize("name", ["w4g32", "w8"])
def test_auto_sends_only_bf16_activations_through_the_kernel(name):
    """torch's kernels are slow for fp32 activations (BENCHMARKS.md): auto multiplies those
    through the decoded weight, bf16 ones through the kernel; a named kernel takes both."""
    q = layer(name)
    x = torch.randn(4, 512)
    ref = q(x)
    q.use_kernel("auto")
    q._kernel = counting = Counting(q.built_kernel())
    assert torch.equal(q(x), ref) and counting.calls == 0
    q(x.bfloat16())
    assert counting.calls == 1
    q.use_kernel(EXPECTED[name])
    q._kernel = counting = Counting(q.built_kernel())
    q(x)
    assert counting.calls == 1
