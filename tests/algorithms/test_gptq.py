"""GPTQ against a naive one-column-at-a-time reference with explicit H^-1 downdates."""

import logging

import pytest
import torch

from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize
from lowbit.algorithms.rtn import hessian_loss, rtn_quantize
from lowbit.formats.integer import fit_qparams, fit_weight, quantize
from lowbit.scheme import parse_scheme


def naive_gptq(w, hinv, order, quant):
    """OBS-style reference: quantize column j, spread its error with row j of H^-1 over the
    other columns, then downdate H^-1 <- H^-1 - H^-1[:, j] H^-1[j, :] / H^-1[j, j], which
    removes column j from later updates. ``quant(col, j, w)`` returns the rounded column."""
    w, hinv = w.clone().double(), hinv.clone().double()
    out = torch.zeros_like(w)
    for j in order:
        out[:, j] = quant(w[:, j], j, w)
        err = (w[:, j] - out[:, j]) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]
        hinv -= torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]
    return out


def test_notes_example_1x3():
    # 000, Example 2: w = [1.3, 2.7, 2.2], rounding to integers, order by increasing
    # H^-1 diagonal (1, 2, 0). The notes never downdate H^-1 between steps; the real
    # algorithm does. Both end at [1, 3, 3]: after index 1 the downdate changes H^-1[2,2]
    # from 3 to 2 and H^-1[2,0] stays -2, so w0 becomes 1.3 - 0.5 = 0.8 instead of the
    # notes' 0.967 -- either rounds to 1. The notes round the tie 2.5 up to 3; with
    # round-half-to-even (torch.round) the tie goes to 2 and the example ends at [2, 3, 2],
    # so this test rounds half away from zero as the notes do.
    hinv = torch.tensor([[4.0, 0, -2], [0, 1, 1], [-2, 1, 3]])
    w = torch.tensor([[1.3, 2.7, 2.2]])
    order = [1, 2, 0]

    def round_half_up(c):
        return torch.sign(c) * torch.floor(c.abs() + 0.5)

    res = naive_gptq(w, hinv, order, lambda c, j, _: round_half_up(c))
    assert res.tolist() == [[1, 3, 3]]
    assert naive_gptq(w, hinv, order, lambda c, j, _: torch.round(c)).tolist() == [[2, 3, 2]]

    # the notes' arithmetic, without the downdate
    x, h = w.clone().double()[0], hinv.double()
    q = torch.zeros(3, dtype=torch.double)
    for j in order:
        q[j] = round_half_up(x[j])
        x -= (x[j] - q[j]) / h[j, j] * h[j]
        x[j] = q[j]
    assert q.tolist() == [1, 3, 3]
    assert torch.round(w[0]).tolist() == [1, 3, 2]  # plain rounding differs at index 2


def _correlated(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    mix = torch.eye(d) + 0.6 * torch.randn(d, d, generator=g) / d**0.5
    x = z @ mix
    x[:, 3] *= 20  # an outlier channel
    return x, 2 * x.T @ x / n


@pytest.mark.parametrize(
    "name,act_order", [("w4", False), ("w3g16", False), ("w4g16-asym", False), ("w4", True)]
)
def test_fast_matches_naive(name, act_order):
    scheme = parse_scheme(name)
    _, h = _correlated()
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    cfg = GPTQConfig(damp=0.01, act_order=act_order, block_size=32)
    qw, _ = gptq_quantize(w, h, scheme, cfg)
    hd = h + 0.01 * torch.diag(h).mean() * torch.eye(64)
    order = torch.argsort(torch.diag(h), descending=True).tolist() if act_order else list(range(64))
    pos = {c: i for i, c in enumerate(order)}
    gs = scheme.group_size if scheme.granularity == "group" else 64
    params = {}
    if scheme.granularity != "group":
        s, z = fit_weight(w, scheme)
        params = {0: (s[:, 0].double(), z[:, 0].double())}

    def quant(col, j, wcur):
        if scheme.granularity == "group" and pos[j] % gs == 0:
            cols = order[pos[j] : pos[j] + gs]
            s, z = fit_qparams(wcur[:, cols].float(), scheme)
            params[pos[j] // gs] = (s[:, 0].double(), z[:, 0].double())
        s, z = params[pos[j] // gs if scheme.granularity == "group" else 0]
        return s * (quantize(col, s, z, scheme.bits) - z)

    ref = naive_gptq(w, torch.linalg.inv(hd.double()), order, quant).float()
    fast = qw.dequantize()
    same = torch.isclose(fast, ref, atol=1e-5).float().mean()
    assert same > 0.995  # float32 vs float64: a rare rounding tie may fall the other way
    assert hessian_loss(fast - w, h) == pytest.approx(hessian_loss(ref - w, h), rel=0.02)


@pytest.mark.parametrize("name", ["w4g16", "w3g16", "w2g16", "w4g16-asym", "w4"])
def test_beats_rtn_on_correlated_inputs(name):
    x, h = _correlated()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    qw, info = gptq_quantize(w, h, parse_scheme(name))
    rtn = rtn_quantize(w, parse_scheme(name))
    err_gptq = torch.linalg.norm(x @ (w - qw.dequantize()).T)
    err_rtn = torch.linalg.norm(x @ (w - rtn.dequantize()).T)
    assert err_gptq < 0.9 * err_rtn
    assert info["loss"] < info["rtn_loss"]


def test_act_order_groups_carry_g_idx():
    # Fixed data: act-order with groups fitted as GPTQ reaches them puts the outlier channel's
    # neighbours in the ordering into one group; on 16 rows that loses to RTN for about 1 in
    # 130 random weights (seeds 50, 53, 299 of 0..399), so this check is about the common case.
    _, h = _correlated()
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    qw, info = gptq_quantize(w, h, parse_scheme("w4g16"), GPTQConfig(act_order=True))
    assert qw.g_idx is not None and sorted(qw.g_idx.tolist()) == sorted(
        [i // 16 for i in range(64)]
    )
    assert info["loss"] < info["rtn_loss"]
    st, _ = gptq_quantize(
        w, h, parse_scheme("w4g16"), GPTQConfig(act_order=True, static_groups=True)
    )
    assert st.g_idx is None


def test_dead_inputs_and_damping_escalation(caplog):
    x = torch.randn(8, 32)  # fewer samples than inputs: H is singular
    x[:, 5] = 0  # a dead input channel
    h = 2 * x.T @ x / 8
    w = torch.randn(4, 32)
    with caplog.at_level(logging.WARNING):
        qw, info = gptq_quantize(w, h, parse_scheme("w4g8"), GPTQConfig(damp=0.0))
    assert torch.isfinite(qw.dequantize()).all()
    assert info["damp"] > 0 and "Cholesky failed" in caplog.text
    assert (
        qw.dequantize()[:, 5].abs().max() <= qw.scale.float().max()
    )  # dead column quantized to ~0
