"""NF4 (QLoRA), normal-quantile grids, nearest-code rounding, double quantization, ternary."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm

from lowbit.formats.codebooks import (
    DQ_BLOCK,
    dynamic_map_8bit,
    lookup,
    nearest_code,
    nf4_absmax,
    nf4_bits_per_weight,
    nf4_codebook,
    nf4_dequantize,
    nf4_quantize,
    quantile_codebook,
    ternary_dequantize,
    ternary_quantize,
)

# The published NF4 table: bitsandbytes' NF4 lookup values (bitsandbytes/functional.py
# get_4bit_type("nf4") and its CUDA dequantization table; also listed in the QLoRA paper,
# Dettmers et al. 2023, appendix E).
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_matches_published_table() -> None:
    cb = nf4_codebook()
    assert cb.dtype == torch.float32 and cb.shape == (16,)
    assert torch.allclose(cb.double(), torch.tensor(PUBLISHED_NF4, dtype=torch.float64), atol=1e-6)
    assert cb[7] == 0 and cb[0] == -1 and cb[-1] == 1  # exact zero, 7 negative, 8 positive


def test_quantile_grid_follows_its_formula() -> None:
    q = quantile_codebook(4, normalize=False).double()
    p = (2 * torch.arange(16, dtype=torch.float64) + 1) / 32
    assert torch.allclose(q, torch.from_numpy(norm.ppf(p.numpy())), atol=1e-6)
    assert torch.equal(q, -q.flip(0))
    assert quantile_codebook(4).max() == 1.0
    assert torch.allclose(quantile_codebook(4).double(), q / q.max(), atol=1e-7)
    assert quantile_codebook(3).numel() == 8


def test_quantile_grid_4bit_values_to_two_decimals() -> None:
    # The course notes (reference 000, section 4.2) give the formula Phi^-1((2i+1)/32) but list
    # -1.96, -1.44, -1.13, -0.90, -0.70, -0.53, -0.37, -0.22, which the formula does not give:
    # Phi^-1(1/32) = -1.863 (-1.96 is Phi^-1(1/40)). Following the formula (the primary source
    # here), the 4-bit levels before normalising are:
    expected = [-1.86, -1.32, -1.01, -0.78, -0.58, -0.40, -0.24, -0.08]
    expected += [-v for v in reversed(expected)]
    q = quantile_codebook(4, normalize=False)
    assert [round(v, 2) for v in q.tolist()] == expected
    notes = [-1.96, -1.44, -1.13, -0.90, -0.70, -0.53, -0.37, -0.22]
    assert all(abs(a - b) > 0.05 for a, b in zip(notes, q[:8].tolist(), strict=True))


def test_nearest_code_ties_go_to_the_lower_index() -> None:
    cb = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    x = torch.tensor([-0.5, 0.25, 0.75, -0.50001, 0.2500001, -9.0, 9.0, 0.6])
    codes = nearest_code(x, cb)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [0, 1, 2, 0, 2, 0, 3, 2]
    assert lookup(codes, cb).tolist() == [-1.0, 0.0, 0.5, -1.0, 0.5, -1.0, 1.0, 0.5]


def test_nearest_code_is_the_argmin() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g)
    cb = nf4_codebook()
    brute = (x[:, None] - cb[None, :]).abs().argmin(dim=1)
    assert torch.equal(nearest_code(x, cb).long(), brute)


def test_codebook_errors() -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        nearest_code(torch.tensor([float("nan")]), nf4_codebook())
    with pytest.raises(ValueError, match="strictly increasing"):
        nearest_code(torch.tensor([0.0]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        lookup(torch.tensor([16]), nf4_codebook())
    with pytest.raises(ValueError, match="integer codes"):
        lookup(torch.tensor([1.0]), nf4_codebook())
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        quantile_codebook(0)


def test_dynamic_map_shape() -> None:
    d = dynamic_map_8bit()
    assert d.numel() == 256 and bool((d[1:] > d[:-1]).all())
    assert (d > 0).sum() == 128 and (d < 0).sum() == 127 and (d == 0).sum() == 1
    assert d[-1] == 1.0 and d[0] == pytest.approx(-0.99296875)
    assert d[d > 0][0] == pytest.approx(0.55e-6)  # smallest level: 10^-6 * (0.1 + 1) / 2


def test_nf4_round_trip_and_error_bound() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g)
    q = nf4_quantize(w, block=64)
    assert q["codes"].shape == w.shape and q["codes"].dtype == torch.uint8
    assert q["absmax"].shape == (w.numel() // 64,)
    r = nf4_dequantize(q)
    cb = nf4_codebook()
    half_gap = float((cb[1:] - cb[:-1]).max()) / 2
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert bool(((r - w).reshape(-1, 64).abs() <= absmax * half_gap + 1e-6).all())
    # Each block's absmax element is stored exactly (as +-1 times absmax).
    assert torch.equal(r.reshape(-1, 64).abs().amax(1), absmax.squeeze(1))


def test_nf4_exact_on_grid_and_zero_blocks() -> None:
    cb = nf4_codebook()
    w = torch.cat([cb * 3.0, cb * 0.5, torch.zeros(32)]).reshape(4, 16)
    q = nf4_quantize(w, block=16)
    assert torch.equal(nf4_dequantize(q), w)
    assert q["codes"][3].tolist() == [7] * 16 and q["absmax"][3] == 0


def test_nf4_double_quant_close_to_plain() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(576, 64, generator=g) * 0.02  # 576 blocks: two full DQ blocks + a partial
    plain, dq = nf4_quantize(w), nf4_quantize(w, double_quant=True)
    assert set(dq) == {"codes", "absmax_codes", "absmax_scale", "absmax_offset"}
    assert dq["absmax_codes"].dtype == torch.uint8 and dq["absmax_codes"].numel() == 576
    assert dq["absmax_scale"].numel() == -(-576 // DQ_BLOCK)
    assert torch.allclose(dq["absmax_offset"], plain["absmax"].mean())
    # The reconstructed absmax is within one dynamic-map step of the true one.
    err = (nf4_absmax(dq) - plain["absmax"]).abs()
    assert float(err.max()) <= float(dq["absmax_scale"].max()) * 0.02
    e_plain = (nf4_dequantize(plain) - w).pow(2).mean()
    e_dq = (nf4_dequantize(dq) - w).pow(2).mean()
    assert e_dq <= e_plain * 1.02


def test_nf4_bits_per_weight() -> None:
    assert nf4_bits_per_weight(64) == 4.5
    assert nf4_bits_per_weight(64, double_quant=True) == pytest.approx(4.127, abs=5e-4)
    assert nf4_bits_per_weight(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)


def test_nf4_errors() -> None:
    with pytest.raises(ValueError, match=r"block size 64 does not divide the 96 .*\[16, 32\]"):
        nf4_quantize(torch.randn(8, 12))
    with pytest.raises(ValueError, match="NaN or inf"):
        nf4_quantize(torch.tensor([float("inf")] * 64))


def test_ternary_absmean() -> None:
    w = torch.tensor([[0.5, -0.1, 2.0], [-1.5, 0.0, 0.2]])
    codes, gamma = ternary_quantize(w)
    assert gamma.item() == pytest.approx(4.3 / 6)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, 0, 1], [-1, 0, 0]]  # w/gamma = .70 -.14 2.8 / -2.1 0 .28
    assert torch.allclose(ternary_dequantize(codes, gamma), codes.float() * 4.3 / 6)


def test_ternary_zero_and_errors() -> None:
    codes, gamma = ternary_quantize(torch.zeros(8))
    assert codes.tolist() == [0] * 8 and gamma > 0
    with pytest.raises(ValueError, match="NaN or inf"):
        ternary_quantize(torch.tensor([float("nan"), 1.0]))
