"""KV-cache formats against their definitions: the reference document's axes (keys per channel,
reduced over tokens; values per token, reduced over channels), min-max asymmetric codes
recomputed independently in float64, packed sizes, float8 against torch's float8 dtypes, RoPE
undone exactly, and the names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.kv import (
    FP8,
    KVSpec,
    apply_rope,
    dequantize_fp8,
    exact_entries,
    fp8_scale,
    parse_kv,
    quantize_fp8,
    quantize_int,
    undo_rope,
)
from lowbit.formats.pack import packed_bytes


def kv(seed: int = 0, shape=(2, 3, 32, 16)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference_codes(x: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Min-max asymmetric rounding along ``axis`` in float64, with the scale and minimum
    rounded to fp16 first (as they are stored)."""
    lo = x.min(axis=axis, keepdims=True).astype(np.float16).astype(np.float64)
    hi = x.max(axis=axis, keepdims=True)
    scale = ((hi - lo) / (2**bits - 1)).astype(np.float16).astype(np.float64)
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint((x - lo) / scale), 0, 2**bits - 1)
    return q * scale + lo


def test_values_per_token_take_groups_of_channels():
    x = kv(7, (1, 2, 5, 64))
    block = quantize_int(x, 2, -1, 32)
    assert block.scale.shape == (1, 2, 5, 2, 1) and block.decode().shape == x.shape
    want = reference_codes(x.double().numpy().reshape(1, 2, 5, 2, 32), 2, -1).reshape(x.shape)
    np.testing.assert_allclose(block.decode().double().numpy(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [-2, -1])
def test_integer_codes_equal_an_independent_min_max_rounding(bits, axis):
    x = kv(bits)
    block = quantize_int(x, bits, axis)
    want = reference_codes(x.double().numpy(), bits, axis)
    np.testing.assert_allclose(block.decode().double().numpy(), want, rtol=0, atol=1e-5)
    # one scale per channel over the tokens (keys), per token over the channels (values)
    assert block.scale.shape == ((2, 3, 1, 16) if axis == -2 else (2, 3, 32, 1))
    assert block.codes.shape[-1] == packed_bytes(16, bits)
    err = (block.decode() - x).abs()
    assert bool((err <= block.scale.float() / 2 + 1e-3).all())


def test_keys_with_outlier_channels_round_better_per_channel():
    """The reference's reason for KIVI's axes: a key channel that is large at every token (a
    fixed outlier channel) widens every per-token range, but no per-channel range."""
    k = kv(1)
    k[..., 3] += 20
    per_channel = (quantize_int(k, 2, -2).decode() - k).pow(2).mean()
    per_token = (quantize_int(k, 2, -1).decode() - k).pow(2).mean()
    assert per_channel < per_token / 10


def test_stored_bytes_per_token_match_the_blocks():
    spec = parse_kv("kivi-k2v2-r128")
    k, v = kv(2, (1, 3, 32, 64)), kv(3, (1, 3, 32, 64))
    stored = quantize_int(k, 2, -2).nbytes() + quantize_int(v, 2, -1, 32).nbytes()
    assert stored == spec.bytes_per_token(3, 64) * 32
    assert spec.bytes_per_token(3, 64) / (2 * 3 * 64 * 2) < 0.2  # scales included
    # per token in two groups of 32 channels: a scale and a minimum (fp16) each
    assert parse_kv("int8").bytes_per_token(3, 64) == 3 * 2 * (64 + 2 * 4)
    assert parse_kv("int8").bytes_per_token(3, 80) == 3 * 2 * (80 + 4)  # 32 does not divide 80


def test_exact_entries_are_the_spikes_and_the_rest_rounds_on_its_own_range():
    k = kv(6, (1, 2, 32, 16))
    spikes = [(0, 0, 5, 3, 40.0), (0, 1, 17, 9, -35.0), (0, 0, 30, 12, 25.0)]
    for b, h, t, c, v in spikes:
        k[b, h, t, c] = v
    frac = len(spikes) / k.numel()
    pos = exact_entries(k, -2, frac)  # keys: slices are channels over the tokens
    flat = {int(p) for p in pos}
    want = {int(torch.tensor([b, h, t, c]) @ torch.tensor([2 * 32 * 16, 32 * 16, 16, 1]))
            for b, h, t, c, _ in spikes}
    assert flat == want
    block = quantize_int(k, 2, -2, outliers=frac)
    got = block.decode()
    for b, h, t, c, v in spikes:
        assert float(got[b, h, t, c]) == v  # kept exactly (fp16 holds these)
    # every other entry is min-max rounded over its channel without the spike: the float64
    # reference on the channel with the spike replaced by a value inside its range
    rest = k.clone()
    for b, h, t, c, _ in spikes:
        rest[b, h, t, c] = rest[b, h, (t + 1) % 32, c]
    ref = torch.from_numpy(reference_codes(rest.double().numpy(), 2, -2)).float()
    mask = torch.ones_like(k, dtype=torch.bool)
    for b, h, t, c, _ in spikes:
        mask[b, h, t, c] = False
    assert torch.allclose(got[mask], ref[mask], atol=1e-3)
    plain = quantize_int(k, 2, -2).decode()
    for b, h, _t, c, _ in spikes:  # the spike's channel rounds far better without it
        m = mask[b, h, :, c]
        err = (got[b, h, :, c] - k[b, h, :, c])[m].pow(2).mean()
        assert err < (plain[b, h, :, c] - k[b, h, :, c])[m].pow(2).mean() / 5
    # values: per token over groups of channels, the same rule along the channel axis
    vblock = quantize_int(k, 2, -1, 8, outliers=frac)
    assert {float(v) for v in vblock.exact_val} == {s[-1] for s in spikes}


def test_exact_entries_are_counted_in_the_bytes():
    spec = parse_kv("kivi-k2v2-r128-o1")
    assert spec.outliers == 0.01 and parse_kv("kivi-k2v2-r128-s4-o0.5").outliers == 0.005
    k, v = kv(2, (1, 4, 32, 64)), kv(3, (1, 4, 32, 64))
    blocks = [quantize_int(k, 2, -2, 32, 0.01), quantize_int(v, 2, -1, 32, 0.01)]
    n = round(0.01 * k.numel())
    assert all(b.exact_pos.numel() == n and b.exact_pos.dtype == torch.int16 for b in blocks)
    stored = sum(b.nbytes() for b in blocks)
    assert stored == pytest.approx(spec.bytes_per_token(4, 64) * 32, rel=0.01)
    for bad in ("kivi-k2v2-r128-o0", "kivi-k2v2-r128-o60"):
        with pytest.raises(LowbitError, match="percent"):
            parse_kv(bad)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_float8_is_torch_float8_of_the_scaled_values(fmt):
    x = kv(4) * 30
    amax = x.abs().amax()
    s = fp8_scale(amax, fmt)
    assert float(s) == pytest.approx(float(amax) / torch.finfo(FP8[fmt]).max)
    q = quantize_fp8(x, s, fmt)
    assert q.dtype == FP8[fmt]
    assert torch.equal(q, (x / s).to(FP8[fmt]))  # no value beyond the range here: no clamping
    assert torch.equal(dequantize_fp8(q, s), q.float() * s)
    big = quantize_fp8(x * 2, s, fmt)  # beyond calibration: saturates, never inf/nan
    assert bool(big.float().isfinite().all())


def test_rope_is_undone_exactly_also_with_attention_scaling():
    x = kv(5, (1, 2, 10, 16)).double()
    theta = torch.rand(1, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta = torch.cat([theta, theta], -1) * 6
    for a in (1.0, 1.3):  # models with attention scaling fold it into cos and sin
        cos, sin = a * theta.cos(), a * theta.sin()
        y = apply_rope(x, cos, sin)
        ref = x * cos[:, None] + torch.cat([-x[..., 8:], x[..., :8]], -1) * sin[:, None]
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(undo_rope(y, cos, sin), x, rtol=0, atol=1e-12)


def test_names():
    s = parse_kv("kivi-k2v4-r64-g16")
    assert (s.k_bits, s.v_bits, s.residual, s.group, s.k_per_channel, s.pre_rope) == \
        (2, 4, 64, 16, True, False)
    assert parse_kv("kvquant-k2v2-r128").pre_rope
    assert not parse_kv("pertoken-k2v2-r128").k_per_channel
    assert parse_kv("fp8").fp8 == "e4m3" and not parse_kv("fp8").per_head
    assert parse_kv("fp8-e5m2-head").fp8 == "e5m2" and parse_kv("fp8-e5m2-head").per_head
    assert parse_kv("fp16") == KVSpec("fp16") and not parse_kv("none").quantized
    s = parse_kv("kvquant-k2v2-r128-s1-o0.5-h")
    assert (s.sink, s.outliers, s.rotate, s.pre_rope) == (1, 0.005, True, True)
    assert not parse_kv("kivi-k2v2-r128").rotate
    for bad, msg in (("kivi-k2v2-r100", "multiple"), ("kivi-k9v2-r128", "1..8"),
                     ("int3", "unknown KV-cache format")):
        with pytest.raises(LowbitError, match=msg):
            parse_kv(bad)
