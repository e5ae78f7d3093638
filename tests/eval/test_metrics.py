"""The statistics against a base, as ``llama-perplexity --kl-divergence`` defines them, checked
against numpy (its default percentile interpolates linearly, as llama.cpp's does) and against
distributions worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.eval.metrics import against_base, evaluate


class Fixed(nn.Module):
    """A 'model' whose logits are given: (windows, length, vocab)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.i = 0

    def forward(self, input_ids, use_cache=False):
        out = self.logits[self.i : self.i + input_ids.shape[0]]
        self.i += input_ids.shape[0]
        return type("Out", (), {"logits": out})()


def test_statistics_equal_numpys_and_the_definitions():
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 50, (3, 40), generator=g)
    base_logits = torch.randn(3, 40, 50, generator=g) * 3
    q_logits = base_logits + torch.randn(3, 40, 50, generator=g) * 0.5
    r = evaluate(Fixed(q_logits), windows, base=Fixed(base_logits), progress=False)
    lq = torch.log_softmax(q_logits[:, :-1].double(), -1)
    lb = torch.log_softmax(base_logits[:, :-1].double(), -1)
    tgt = windows[:, 1:, None]
    kl = (lb.exp() * (lb - lq)).sum(-1).flatten().numpy()
    dp = (lq.gather(-1, tgt).exp() - lb.gather(-1, tgt).exp()).flatten().numpy()
    nll, nll_b = -lq.gather(-1, tgt).flatten().numpy(), -lb.gather(-1, tgt).flatten().numpy()
    assert r["tokens"] == kl.size == 117
    rel = 1e-4  # the model side runs in fp32, the reference in float64
    assert r["kld_mean"] == pytest.approx(kl.mean(), rel=rel)
    assert r["kld_median"] == pytest.approx(np.median(kl), rel=rel)
    for key, q in (("kld_p999", 99.9), ("kld_p99", 99), ("kld_p95", 95), ("kld_p90", 90),
                   ("kld_p10", 10), ("kld_p5", 5), ("kld_p1", 1), ("kld_p01", 0.1)):
        assert r[key] == pytest.approx(np.percentile(kl, q), rel=rel), key
    for key, q in (("dp_p999", 99.9), ("dp_p75", 75), ("dp_p25", 25), ("dp_p01", 0.1)):
        assert r[key] == pytest.approx(np.percentile(dp, q), rel=rel, abs=1e-7), key
    assert r["kld_max"] == pytest.approx(kl.max(), rel=rel)
    assert r["rms_dp"] == pytest.approx(np.sqrt((dp ** 2).mean()), rel=rel)
    assert r["dp_mean"] == pytest.approx(dp.mean(), rel=rel, abs=1e-7)
    same = (lq.argmax(-1) == lb.argmax(-1)).double().mean()
    assert r["same_top_p"] == pytest.approx(float(same)) == r["top1"]
    assert r["ppl_ratio"] == pytest.approx(math.exp(nll.mean() - nll_b.mean()), rel=rel)
    assert r["ppl"] / r["ppl_base"] == pytest.approx(r["ppl_ratio"], rel=rel)
    assert r["cor_ln_ppl"] == pytest.approx(np.corrcoef(nll, nll_b)[0, 1], rel=rel)


def test_worked_by_hand():
    """Two tokens: the base says (1/2, 1/2) and the model (1/4, 3/4), next token 0; then both
    certain of the same token: KL ln(1/2 / 1/4)/2 + ln(1/2 / 3/4)/2 = 0.5 ln(4/3) ... and 0."""
    kl1 = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    kl = torch.tensor([kl1, 0.0], dtype=torch.float64)
    dp = torch.tensor([0.25 - 0.5, 0.0], dtype=torch.float64)
    nll = torch.tensor([math.log(4), 0.0], dtype=torch.float64)
    nll_b = torch.tensor([math.log(2), 0.0], dtype=torch.float64)
    r = against_base(kl, dp, nll, nll_b, same_top=1)
    assert r["kld_mean"] == pytest.approx(kl1 / 2) and r["kld_median"] == pytest.approx(kl1 / 2)
    assert r["kld_max"] == pytest.approx(kl1) and r["kld_min"] == 0.0
    assert r["kld_p90"] == pytest.approx(0.9 * kl1)  # interpolated between the two values
    assert r["rms_dp"] == pytest.approx(math.sqrt(0.0625 / 2)) and r["dp_min"] == -0.25
    assert r["same_top_p"] == 0.5
    assert r["ppl_ratio"] == pytest.approx(math.sqrt(2))  # exp((ln 4 - ln 2) / 2)
