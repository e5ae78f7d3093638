"""The base model's log-probabilities: computed once, cached on disk, reused; the figures a
cached read gives are the ones an uncached run gives."""

import torch
from conftest import tiny_model

from lowbit.eval.base_cache import BaseLogprobs, base_logprobs, cache_key
from lowbit.eval.metrics import evaluate


def _windows(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(seed))


def test_cached_reads_match_and_skip_the_base(tmp_path):
    base, model, win = tiny_model("llama"), tiny_model("llama", seed=1), _windows()
    calls = []

    def load():
        calls.append(1)
        return base

    first = base_logprobs(load, win, 256, "base-files", tmp_path)
    a = evaluate(model, win, base=first, progress=False)
    assert first.computed == 4 and len(calls) == 1
    again = base_logprobs(load, win, 256, "base-files", tmp_path)
    b = evaluate(model, win, base=again, progress=False)
    assert again.computed == 0 and len(calls) == 1  # the base was not even loaded
    assert a == b
    # fp16 storage: the same figures as exact fp32 log-probabilities, to 1e-3 relative
    exact = evaluate(model, win, base=base, progress=False)
    assert abs(exact["kl_mean"] - a["kl_mean"]) <= 1e-3 * exact["kl_mean"]
    assert exact["top1"] == a["top1"] and exact["ppl"] == a["ppl"]


def test_the_key_changes_with_the_base_and_the_windows(tmp_path):
    w = _windows()
    assert cache_key("a", w) != cache_key("b", w)
    assert cache_key("a", w) != cache_key("a", _windows(4))
    assert cache_key("a", w) != cache_key("a", w[:, :-1])
    assert cache_key("a", w) == cache_key("a", w.clone())


def test_too_large_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_BASE_CACHE_GB", "0.000001")
    notes = []
    lp = base_logprobs(tiny_model("llama"), _windows(), 256, "k", tmp_path, notes.append)
    assert lp.folder is None and "not cached" in notes[0]
    assert isinstance(lp, BaseLogprobs) and lp[0].shape == (1, 23, 256)
    assert not any(tmp_path.rglob("*.pt"))


def test_batched_evaluation_equals_one_window_at_a_time():
    model, win = tiny_model("llama"), _windows()
    one = evaluate(model, win, base=tiny_model("llama", seed=2), progress=False)
    three = evaluate(model, win, base=tiny_model("llama", seed=2), batch=3, progress=False)
    for k in one:
        assert abs(one[k] - three[k]) <= 1e-5 * max(1.0, abs(one[k])), k
