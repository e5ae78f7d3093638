"""Weight-only kernels against the dequantized reference: which grids each takes, every variant
of lowbit's own kernels this CPU runs (AVX-512, AVX2, portable) on every grid they take,
act-order, bf16, torch's int4pack/int8pack when named, and the choice over a whole model."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.grids import get_grid
from lowbit.methods.gptq import gptq_quantize, prepare_hessian
from lowbit.methods.rtn import rtn
from lowbit.runtime import cpu
from lowbit.runtime.kernels import BUILD, check_kernel, kernel_for, lut_form, prepare_kernels
from lowbit.runtime.qlinear import QLinear

EXPECTED = {
    "w4g32": "lut4", "w4g64": "lut4", "w4g128-asym": "lut4", "w4g256": "lut4", "w4g16": "lut4",
    "w4": "lut4", "w3g64": "lut4", "w3g128-asym": "lut4", "w2g32": "lut4", "nf4": "lut4",
    "nf4-dq": "lut4", "fp4-g32": "lut4", "mxfp4": "lut4", "nvfp4": "lut4", "ternary": "lut4",
    "sq4": "lut4", "sq3": "lut4",
    "w8": "u8", "w8-asym": "u8", "w8-tensor": "u8", "w8g64": "u8", "w5g32": "u8", "w6": "u8",
    "fp8-e4m3": "dequant", "mxfp6-e3m2": "dequant", "mxint8": "dequant",
}
OWN = [n for n, k in EXPECTED.items() if k != "dequant"]
TORCH = {"w4g32": "int4pack", "w4g128-asym": "int4pack", "w8": "int8pack", "w8-asym": "int8pack",
         "w8-tensor": "int8pack"}


def layer(name: str, rows: int = 64, cols: int = 512, bias: bool = True) -> QLinear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) * 0.02
    b = torch.randn(rows, generator=g) if bias else None
    sens = torch.rand(cols, generator=g) + 0.5
    return QLinear(rtn(w, get_grid(name), sens), b)


@pytest.mark.parametrize("name", EXPECTED)
def test_auto_picks_the_kernel_that_takes_the_grid(name):
    assert kernel_for(get_grid(name), (64, 512)) == EXPECTED[name]
    q = layer(name)
    assert q.use_kernel("auto") == EXPECTED[name] == q.kernel


def test_kernels_refuse_what_they_cannot_take():
    assert kernel_for(get_grid("w4g64"), (64, 528)) == "dequant"  # 528 is no multiple of 32
    assert kernel_for(get_grid("w8"), (64, 520)) == "dequant"  # nor of 16
    with pytest.raises(LowbitError, match="int4pack kernel cannot multiply a nf4 weight"):
        check_kernel("int4pack", get_grid("nf4"), (64, 512))
    with pytest.raises(LowbitError, match="int4pack kernel cannot multiply a w4g64 weight"):
        check_kernel("int4pack", get_grid("w4g64"), (72, 512))  # rows not in sixteens
    with pytest.raises(LowbitError, match="u8 kernel cannot multiply a nf4"):
        check_kernel("u8", get_grid("nf4"), (64, 512))
    with pytest.raises(LowbitError, match="unknown kernel 'marlin'"):
        check_kernel("marlin", get_grid("w4g64"), (64, 512))


def reference(q: QLinear, x: torch.Tensor) -> torch.Tensor:
    """The decoded weight's product in float64: what fp32 sums in any order approach."""
    w = q.dequantized_weight().double()
    b = 0 if q.bias is None else q.bias.double()
    return x.double() @ w.T + b


@pytest.mark.parametrize("variant", cpu.runnable())
@pytest.mark.parametrize("name", OWN)
def test_own_kernels_equal_the_decoded_weight_in_every_variant(name, variant):
    """Every variant this CPU runs (the suite on an AVX-512 machine runs all three), on every
    grid the kernels take: within fp32 rounding of the float64 product of the decoded weight
    (a bound ~100x below what one wrong code or scale would give), for 1 and for 16 rows."""
    q = layer(name)
    gw = q.grid_weight()
    kernel = BUILD[EXPECTED[name]](gw, isa=variant)
    g = torch.Generator().manual_seed(1)
    for rows in (1, 16):
        x = torch.randn(rows, 512, generator=g)
        ref = reference(q, x) - (0 if q.bias is None else q.bias.double())
        y = kernel(x)
        assert y.dtype == torch.float32 and y.shape == (rows, 64)
        scale = float(x.abs().sum(-1).max()) * float(gw.dequantize().abs().max())
        assert float((y.double() - ref).abs().max()) <= 1e-6 * scale, (name, variant)


HALF_SCALES = {"w4g32", "w4g64", "w3g64"}


@pytest.mark.parametrize("variant", cpu.runnable())
@pytest.mark.parametrize("name", ["w4g32", "w4g64", "w3g64", "nf4", "w4g128-asym", "fp4-g32"])
def test_lut4_keeps_scales_in_fp16_exactly_when_they_are_fp16_values(name, variant):
    """Symmetric integer grids store fp16 scales: lut4 keeps them in half the bytes, and the
    product is bit for bit the fp32 scales' (16 and 8 groups a row: the vector conversion and
    the scalar tail). Offsets (asym) or scales no fp16 holds stay
    fp32 (NF4 stores an fp32 absmax, as bitsandbytes does)."""
    kernel = BUILD["lut4"](layer(name).grid_weight(), isa=variant)
    assert (kernel.scale.dtype == torch.float16) == (name in HALF_SCALES)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    y = kernel(x)
    kernel.scale = kernel.scale.float()
    assert torch.equal(y, kernel(x))


def q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the a8 kernels see it: each 32 columns rounded to int8 steps of max|x| / 127
    (llama.cpp's Q8_0), computed here by torch in fp32."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    return (torch.where(d > 0, torch.round(xb / d), 0.0) * d).reshape(x.shape)


A8 = {"w4g32": "int4-a8", "w4g64": "int4-a8", "w4g128-asym": "int4-a8", "w4": "int4-a8",
      "w3g64": "int4-a8", "w2g32": "int4-a8", "w8": "int8-a8", "w8-asym": "int8-a8",
      "w8g64": "int8-a8", "w5g32": "int8-a8", "w6": "int8-a8", "w8-tensor": "int8-a8"}


@pytest.mark.parametrize("variant", cpu.runnable())
@pytest.mark.parametrize("name", A8)
def test_a8_kernels_equal_the_decoded_weight_times_the_quantized_x(name, variant):
    """The int8-activation kernels in every variant (VNNI, AVX-512BW's split 8-bit codes, AVX2,
    portable): the decoded weight times x quantized per 32 columns, to fp32 rounding - with
    544 columns too, an odd number of 32-column chunks (padded to 64)."""
    for cols in (512, 544) if get_grid(name).group_size in (None, 32) else (512,):
        q = layer(name, cols=cols)
        gw = q.grid_weight()
        assert check_kernel(A8[name], gw.grid, gw.shape) == A8[name]
        kernel = BUILD[A8[name]](gw, isa=variant)
        g = torch.Generator().manual_seed(1)
        for rows in (1, 16):
            x = torch.randn(rows, cols, generator=g) * torch.rand(cols, generator=g) * 4
            xq = q8_blocks(x)
            ref = xq.double() @ gw.dequantize().double().T
            y = kernel(x)
            assert y.dtype == torch.float32 and y.shape == (rows, 64)
            scale = float(xq.abs().sum(-1).max()) * float(gw.dequantize().abs().max())
            assert float((y.double() - ref).abs().max()) <= 1e-6 * scale, (name, variant, cols)
            # and not the exact product: the quantized x is what is multiplied
            exact = x.double() @ gw.dequantize().double().T
            assert float((y.double() - exact).abs().max()) > 1e-5 * scale


def test_a8_kernels_take_integer_grids_only():
    assert check_kernel("int4-a8", get_grid("w3g128-asym"), (64, 512)) == "int4-a8"
    for name, grid in (("int4-a8", "nf4"), ("int4-a8", "w8"), ("int8-a8", "w4g32"),
                       ("int4-a8", "nvfp4")):
        with pytest.raises(LowbitError, match=f"{name} kernel cannot multiply"):
            check_kernel(name, get_grid(grid), (64, 512))
    assert kernel_for(get_grid("w4g32"), (64, 512)) == "lut4"  # never chosen by auto: inexact
    for grid, want in (("w4g32", "int4-a8"), ("w6", "int8-a8"), ("nf4", "lut4"),
                       ("fp8-e4m3", "dequant")):  # auto-a8: a8 where it applies, else auto
        assert check_kernel("auto-a8", get_grid(grid), (64, 512)) == want


@pytest.mark.parametrize("name", ["w4g32", "w3g64", "w8"])
def test_integer_weights_are_read_back_bit_for_bit(name):
    """x = I gives W^T, one product per output: a symmetric integer grid's table is q - zero,
    so every weight the kernel sees is exactly the decoded one."""
    q = layer(name, bias=False)
    kernel = BUILD[EXPECTED[name]](q.grid_weight())
    assert torch.equal(kernel(torch.eye(512)).T, q.dequantized_weight())


def test_lut_form_finds_each_grids_table():
    nf4 = lut_form(layer("nf4").grid_weight())
    assert nf4[0].shape == (1, 16) and nf4[2] is None  # one table: NF4's levels over absmax
    nf4_levels = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                  -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                  0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                  0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                  0.7229568362236023, 1.0]  # QLoRA's table (bitsandbytes)
    torch.testing.assert_close(nf4[0][0], torch.tensor(nf4_levels))
    sq = lut_form(layer("sq3").grid_weight())
    assert sq[0].shape == (64, 16) and bool((sq[0][:, 8:] == 0).all())  # a table per row
    asym = lut_form(layer("w4g128-asym").grid_weight())
    assert torch.equal(asym[0], torch.arange(16.0)) and asym[2] is not None  # zero points


def test_lut_form_refuses_values_no_table_gives():
    """A grid whose codes' values are not one table times a scale per group is refused, not
    multiplied wrongly."""
    from lowbit.formats.grids_lut import Nf4Grid

    class Bent(Nf4Grid):
        def decode(self, codes, params):  # a per-code term that does not scale with the group
            return super().decode(codes, params) + codes.float() * 1e-3

    gw = layer("nf4").grid_weight()
    gw.grid = Bent()
    with pytest.raises(LowbitError, match="does not decompose"):
        lut_form(gw)


def test_a_variant_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_ISA", "sse9")
    with pytest.raises(LowbitError, match="LOWBIT_CPU_ISA='sse9'"):
        cpu.isa()
    monkeypatch.setenv("LOWBIT_CPU_ISA", "portable")
    assert cpu.isa() == "portable"


@pytest.mark.parametrize("name", TORCH)
def test_torch_kernels_when_named_equal_the_reference(name):
    q = layer(name)
    x = torch.randn(2, 7, 512, generator=torch.Generator().manual_seed(1))
    ref = q(x)
    q.use_kernel(TORCH[name])  # named: used for fp32 activations too
    y = q(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    yb = q(x.bfloat16())  # bf16 activations stay bf16 through the kernel
    assert yb.dtype == torch.bfloat16
    assert float((yb.float() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


@pytest.mark.parametrize("name", ["w4g32", "w8"])
def test_torch_kernels_read_back_the_decoded_weight(name):
    q = layer(name, bias=False)
    ref = q.dequantized_weight()
    q.use_kernel(TORCH[name])
    assert torch.equal(q.built_kernel()(torch.eye(512)).T, ref)


@pytest.mark.parametrize("kernel", ["lut4", "int4pack"])
def test_act_order_groups_are_gathered_back(kernel):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g) * 0.02
    x = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3, 256)
    hes = prepare_hessian(2 * x.T @ x / 512, act_order=True, damp=0.01)
    gw = gptq_quantize(w, hes, get_grid("w4g64"), 128, static_groups=False)
    assert gw.g_idx is not None and not torch.equal(gw.g_idx, torch.arange(256) // 64)
    q = QLinear(gw)
    ref = q(x[:5])
    assert q.use_kernel(kernel) == kernel
    torch.testing.assert_close(q(x[:5]), ref, rtol=1e-5, atol=1e-5)


def test_act_order_a8_quantizes_x_in_the_gathered_order():
    """With act-order, x's columns are gathered into the weight's groups first, and quantized
    per 32 of those."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g) * 0.02
    x = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3, 256)
    hes = prepare_hessian(2 * x.T @ x / 512, act_order=True, damp=0.01)
    gw = gptq_quantize(w, hes, get_grid("w4g64"), 128, static_groups=False)
    q = QLinear(gw)
    perm = torch.argsort(gw.g_idx.long(), stable=True)
    ref = q8_blocks(x[:5, perm]).double() @ q.dequantized_weight()[:, perm].double().T
    assert q.use_kernel("int4-a8") == "int4-a8"
    torch.testing.assert_close(q(x[:5]).double(), ref, rtol=1e-5, atol=1e-5)


def test_prepare_kernels_counts_the_model_and_dequant_undoes_it():
    model = torch.nn.Sequential(layer("w4g64"), torch.nn.ReLU(), layer("nf4", 512, 64),
                                layer("w8", 64, 512), torch.nn.ReLU(),
                                layer("fp8-e4m3", 512, 64))
    x = torch.randn(3, 512)
    ref = model(x)
    assert prepare_kernels(model, "auto") == {"lut4": 2, "u8": 1, "dequant": 1}
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert prepare_kernels(model, "dequant") == {"dequant": 4}
    assert torch.equal(model(x), ref)


def test_many_rows_go_through_the_decoded_weight():
    """A prompt or an evaluation window (more than KERNEL_MAX_ROWS rows) is multiplied densely
    (bit for bit the reference); a decode step through the kernel."""
    from lowbit.runtime.qlinear import KERNEL_MAX_ROWS

    q = layer("w4g64-asym")
    x = torch.randn(KERNEL_MAX_ROWS + 1, 512)
    ref = q(x)
    q.use_kernel("auto")
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


def test_auto_routes_every_dtype_through_lowbits_kernels_and_torchs_only_bf16():
    """lowbit's kernels take fp32, bf16 and fp16 activations (multiplied in fp32); torch's
    int4pack, slow for fp32, takes only bf16 unless named... and is never auto's choice."""
    q = layer("w4g32")
    x = torch.randn(4, 512)
    q.use_kernel("auto")
    q._kernel = counting = Counting(q.built_kernel())
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert q(x.to(dt)).dtype == dt
    assert counting.calls == 3 and q.cache is False
    q.use_kernel("int4pack")
    q._kernel = counting = Counting(q.built_kernel())
    q(x)
    q(x.bfloat16())
    assert counting.calls == 2


def test_the_command_lines_offer_every_kernel():
    from lowbit.cli.common import KERNEL_CHOICES
    from lowbit.runtime.kernels import KERNELS

    assert KERNEL_CHOICES == KERNELS


def test_kernels_by_kind_names_each_layer_kind():
    from lowbit.runtime.kernels import kernels_by_kind

    blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"up": layer("w4g64"), "down": layer(d)})
                                 for d in ("fp8-e4m3", "w8", "w8"))
    model = torch.nn.ModuleDict({"layers": blocks})
    prepare_kernels(model, "auto")
    assert kernels_by_kind(model) == {"up": "lut4", "down": "u8/dequant"}


def test_without_a_compiler_auto_says_so_and_decodes(monkeypatch, capsys):
    """No C++ compiler: auto notes it and multiplies through the decoded weights; a kernel
    named on the command line is a one-line error."""
    def no_build():
        raise LowbitError("could not build lowbit's CPU kernels (no compiler)")

    monkeypatch.setattr(cpu, "ops", no_build)
    model = torch.nn.Sequential(layer("w4g64"), layer("w8", 64, 64))
    assert prepare_kernels(model, "auto") == {"dequant": 2}
    assert "could not build lowbit's CPU kernels" in capsys.readouterr().err
    with pytest.raises(LowbitError, match="could not build"):
        prepare_kernels(torch.nn.Sequential(layer("w4g64"), layer("nf4", 64, 64)), "lut4")


@pytest.mark.parametrize("names", [("w4g32", "w4g32", "w4g32"), ("nf4-g32", "w4g32", "mxfp4"),
                                   ("w4g32-asym", "w4g32"), ("sq4", "w4"),
                                   ("w8", "w8-asym"), ("int4-a8", "w4g32", "w4g32-asym")])
def test_fused_siblings_equal_each_product(names):
    """Weights that read one input, stacked into one kernel: one product equals the separate
    ones row for row (the sums of a row do not change), across tables, scale dtypes and
    offsets; kinds, groups or act-orders that differ do not fuse."""
    from lowbit.runtime.kernels import fuse

    kernel = None
    if names[0] == "int4-a8":
        kernel, names = "int4-a8", names[1:]
    qs = [layer(n, rows=32 * (i + 1)) for i, n in enumerate(names)]
    kernels = [BUILD[kernel or q.use_kernel("auto")](q.grid_weight()) for q in qs]
    fused = fuse(kernels)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fused(x), torch.cat([k(x) for k in kernels], -1))
    assert fuse(kernels[:1]) is None


def test_only_kernels_of_one_kind_and_group_fuse():
    from lowbit.runtime.kernels import fuse

    def own(name):
        q = layer(name)
        return BUILD[q.use_kernel("auto")](q.grid_weight())

    assert fuse([own("w4g32"), own("w4g64")]) is None  # groups differ
    assert fuse([own("w4"), own("w8")]) is None  # lut4 and u8
    assert fuse([own("w4g32"), BUILD["int4-a8"](layer("w4g32").grid_weight())]) is None
    assert fuse([own("w4g32"), own("w4g32")]) is not None
