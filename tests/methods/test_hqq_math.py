"""HQQ with integer zero points (lowbit.methods.hqq_math): conventions, worked examples, and
the error it claims against lowbit's own quantize / dequantize."""

import pytest
import torch

from lowbit.formats.integer import dequantize, qparams_from_range, quantize
from lowbit.methods.hqq_math import hqq_fit, hqq_qparams, lp_error, shrink_lp, smallest_scale


def heavy_tailed(rows: int = 192, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Student-t (3 degrees of freedom) rows with per-row scales and offsets, like weights."""
    g = torch.Generator().manual_seed(seed)
    chi2 = (torch.randn(3, rows, n, generator=g) ** 2).sum(0)
    t = torch.randn(rows, n, generator=g) / (chi2 / 3).sqrt()
    scale = torch.rand(rows, 1, generator=g) * 0.1 + 0.01
    return (t * scale + 0.3 * scale * torch.randn(rows, 1, generator=g)).float()


def naive_error(w, scale, zero, bits, p, weight=None):
    """sum_j c_j |w_j - w_hat_j|^p, row by row in plain Python over lowbit's quantizer."""
    out = []
    for i in range(w.shape[0]):
        q = quantize(w[i], scale[i], zero[i], bits)
        r = (w[i] - dequantize(q, scale[i], zero[i])).abs().double()
        c = torch.ones_like(r) if weight is None else weight[i].double()
        out.append(float((c * r**p).sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_shrink_lp_by_hand():
    x = torch.tensor([2.0, -2.0, 0.3, 0.0])
    # p = 1: soft threshold at 1 / beta = 0.5
    assert shrink_lp(x, 2.0, 1.0).tolist() == [1.5, -1.5, 0.0, 0.0]
    # p = 0.7: |x| - |x|^-0.3 / beta; 2^-0.3 / 2 = 0.40613; 0.3^-0.3 / 2 = 0.71 > 0.3 -> 0
    got = shrink_lp(x, 2.0, 0.7)
    assert got[0].item() == pytest.approx(2 - 2**-0.3 / 2, abs=1e-6)
    assert got[1].item() == pytest.approx(-(2 - 2**-0.3 / 2), abs=1e-6)
    assert got[2:].tolist() == [0.0, 0.0]


def test_worked_example_asymmetric_2bit():
    # w = [-0.1, 0, 1, 2, 3] on 2 bits. Min-max: s0 = 3.1 / 3 rounded up into fp16
    # = 1.0341797, zero round(0.1 / s0) = 0; errors 0.1, 0, 0.0342, 0.0684, 0.1025 ->
    # squared sum 0.02636. The integer grid s = 1, z = 0 ({0, 1, 2, 3}) misses only -0.1
    # (error 0.1 = s / 10 < s / 2, so no clipping) -> 0.01. It is the least-squares scale of
    # those codes (sum d w / sum d^2 = 14 / 14) and z = 1 would need s >= 3 / 2.5 = 1.2.
    w = torch.tensor([[-0.1, 0.0, 1.0, 2.0, 3.0]])
    s0, z0 = qparams_from_range(w.min(1, keepdim=True).values, w.max(1, keepdim=True).values,
                                2, False)
    assert s0.item() == pytest.approx(1.0341797, abs=1e-7) and z0.item() == 0
    for p in (2.0, 0.7):
        f = hqq_fit(w, 2, lp_norm=p)
        assert f.scale.item() == 1.0 and f.zero.item() == 0.0
        assert f.error.item() == pytest.approx(0.1**p, rel=1e-5)
    f = hqq_fit(w, 2, lp_norm=2.0)
    assert f.start_error.item() == pytest.approx(0.1**2 + 0.0341797**2 + 0.0683594**2
                                                 + 0.1025391**2, rel=1e-4)


def test_worked_example_symmetric_2bit():
    # Symmetric 2 bits: zero 2, levels s * {-2, -1, 0, 1}. w = [-2, -1, 0, 1]: min-max uses
    # s = absmax / 1.5 = 4/3 and misses -2, -1 and 1 (squared error 4/9 + 1/9 + 1/9 = 2/3);
    # s = 1 represents the row exactly, and the smallest non-clipping scale for zero 2 is
    # max(2 / 2.5, 1 / 1.5) = 0.8 <= 1.
    w = torch.tensor([[-2.0, -1.0, 0.0, 1.0]])
    assert smallest_scale(torch.tensor(2.0), w.min(), w.max(), 2).item() == pytest.approx(0.8)
    f = hqq_fit(w, 2, symmetric=True, lp_norm=2.0)
    assert f.scale.item() == 1.0 and f.zero.item() == 2.0
    assert f.error.item() == 0.0
    assert f.start_error.item() == pytest.approx(2 / 3, rel=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_conventions_and_claimed_error(bits, symmetric, clip):
    w = heavy_tailed(seed=bits)
    f = hqq_fit(w, bits, symmetric=symmetric, clip=clip)
    for t in f:
        assert t.shape == (w.shape[0], 1) and t.dtype == torch.float32
    qmax = (1 << bits) - 1
    assert torch.equal(f.zero, f.zero.round())
    assert f.zero.min() >= 0 and f.zero.max() <= qmax
    if symmetric:
        assert (f.zero == 1 << (bits - 1)).all()
    assert (f.scale > 0).all()
    assert torch.equal(f.scale, f.scale.half().float())  # a reload from fp16 is exact
    # the claimed objective is the error of lowbit's quantize / dequantize with these params
    assert torch.allclose(f.error.double().squeeze(1),
                          naive_error(w, f.scale, f.zero, bits, 0.7), rtol=1e-5, atol=1e-9)
    # the start is min-max, and the result is never worse
    s0, z0 = qparams_from_range(w.min(1, keepdim=True).values, w.max(1, keepdim=True).values,
                                bits, symmetric)
    assert torch.allclose(f.start_error.double().squeeze(1),
                          naive_error(w, s0, z0, bits, 0.7), rtol=1e-5, atol=1e-9)
    assert (f.error <= f.start_error).all()
    s, z = hqq_qparams(w, bits, symmetric, clip=clip)
    assert torch.equal(s, f.scale) and torch.equal(z, f.zero)


@pytest.mark.parametrize("p", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_improves_on_min_max_without_clipping(p, symmetric):
    w = heavy_tailed(seed=7)
    f = hqq_fit(w, 4, symmetric=symmetric, lp_norm=p)
    # (heavy tails leave little room without clipping: 2.7% at p = 0.7, 12% at p = 2 symmetric)
    assert float(f.error.sum()) < 0.985 * float(f.start_error.sum())
    # clip=False: every weight stays within half a step of its reconstruction
    r = (w - dequantize(quantize(w, f.scale, f.zero, 4), f.scale, f.zero)).abs()
    assert (r.amax(1, keepdim=True) <= f.scale / 2 * (1 + 1e-4)).all()


def test_clipping_lowers_an_lp_objective_but_clips():
    # the measured reason for clip=False: with p < 2 the free scale clips the extremes
    w = heavy_tailed(seed=3)
    free = hqq_fit(w, 4, clip=True, scan=(0.6, 1.05, 10))
    held = hqq_fit(w, 4)
    assert float(free.error.sum()) < float(held.error.sum())
    r = (w - dequantize(quantize(w, free.scale, free.zero, 4), free.scale, free.zero)).abs()
    assert (r.amax(1, keepdim=True) > free.scale / 2 * 1.01).any()


@pytest.mark.parametrize("options", [
    {}, {"lp_norm": 2.0}, {"scan": None}, {"opt_scale": False}, {"clip": True},
    {"scan": None, "clip": True},
])
def test_rows_are_independent_and_deterministic(options):
    # vectorised over rows with rows leaving the loop early: a row's result must not depend
    # on which other rows are fitted with it, nor on the call
    w = heavy_tailed(rows=64, seed=11)
    whole = hqq_fit(w, 3, **options)
    again = hqq_fit(w.clone(), 3, **options)
    for a, b in zip(whole, again, strict=True):
        assert torch.equal(a, b)
    parts = [hqq_fit(w[i : i + 16], 3, **options) for i in range(0, 64, 16)]
    for k in range(4):
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
    assert (whole.error <= whole.start_error).all()


def test_weight_none_equals_ones_and_weighting_moves_the_error():
    w = heavy_tailed(seed=5)
    plain = hqq_fit(w, 3, lp_norm=2.0)
    ones = hqq_fit(w, 3, lp_norm=2.0, weight=torch.ones(w.shape[1]))
    assert torch.equal(plain.scale, ones.scale) and torch.equal(plain.zero, ones.zero)
    c = torch.ones(w.shape[1])
    c[:8] = 100.0  # eight important columns

    def first8(f):
        wh = dequantize(quantize(w, f.scale, f.zero, 3), f.scale, f.zero)
        return float(((w - wh)[:, :8] ** 2).sum())

    for clip, bound in ((True, 0.85), (False, 0.99)):
        weighted = hqq_fit(w, 3, lp_norm=2.0, weight=c, clip=clip)
        assert torch.allclose(weighted.error.double().squeeze(1),
                              naive_error(w, weighted.scale, weighted.zero, 3, 2.0,
                                          c.expand_as(w)), rtol=1e-5)
        assert first8(weighted) < bound * first8(hqq_fit(w, 3, lp_norm=2.0, clip=clip))


def test_degenerate_rows():
    w = torch.zeros(3, 8)
    w[1] = 0.5  # constant row
    w[2, 3] = -1e-3  # a single non-zero
    f = hqq_fit(w, 4)
    assert torch.isfinite(f.scale).all() and (f.scale > 0).all()
    assert (f.error <= f.start_error).all()
    wh = dequantize(quantize(w, f.scale, f.zero, 4), f.scale, f.zero)
    assert wh[0].abs().max() == 0


def test_float32_scales():
    w = heavy_tailed(seed=2)
    f = hqq_fit(w, 4, scale_dtype="float32")
    assert (f.error <= f.start_error).all()
    assert torch.allclose(f.error.double().squeeze(1), naive_error(w, f.scale, f.zero, 4, 0.7),
                          rtol=1e-5)


def test_lp_error_matches_naive():
    w = heavy_tailed(rows=8, seed=9)
    s, z = hqq_qparams(w, 4, lp_norm=0.7)
    assert torch.allclose(lp_error(w, s, z, 4, 0.7).double().squeeze(1),
                          naive_error(w, s, z, 4, 0.7), rtol=1e-5)


@pytest.mark.parametrize("kw", [{"bits": 1}, {"bits": 9}])
def test_rejects_bad_arguments(kw):
    args = {"bits": 4} | kw
    with pytest.raises(ValueError):
        hqq_fit(torch.randn(4, 8), **args)
    with pytest.raises(ValueError):
        hqq_fit(torch.randn(8), 4)
