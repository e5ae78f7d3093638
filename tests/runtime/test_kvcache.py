"""The quantized KV cache inside transformers: equal to the full-precision cache when the
residual window holds every token, close at 8 bits, the same with and without the decoded copy,
stored bytes as the format counts them, keys before RoPE, float8 scales from calibration, and
the command lines (`lowbit eval --kv`, `lowbit generate --kv`)."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import lowbit_cli, one_line_error
from conftest import tiny_model
from transformers import DynamicCache

from lowbit.errors import LowbitError
from lowbit.formats.kv import parse_kv
from lowbit.runtime.kvcache import QuantKVCache, calibrate_kv


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama").eval()


def ids_for(model, n=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, n), generator=g)


@torch.no_grad()
def stepwise(model, ids, cache, prefill=24):
    out = [model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits[:, -1]]
    for t in range(prefill, ids.shape[1] - 1):
        out.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


def test_a_residual_window_over_every_token_is_the_full_precision_cache(model):
    ids = ids_for(model)
    ref = stepwise(model, ids, DynamicCache())
    cache = QuantKVCache(model, "kivi-k2v2-r4096")
    torch.testing.assert_close(stepwise(model, ids, cache), ref, rtol=0, atol=0)
    assert cache.nbytes()["stored"] == 0 and cache.layers[0].stored == 0


@pytest.mark.parametrize("name,tol", [("int8", 0.02), ("kivi-k8v8-r16-g8", 0.02),
                                      ("kvquant-k8v8-r16-g8", 0.02),
                                      ("kvquant-k8v8-r16-g8-h", 0.02),
                                      ("pertoken-k8v8-r16-o2-h", 0.02),
                                      ("kivi-k2v2-r16-g8", 1.0)])
def test_quantized_caches_are_close_and_the_decoded_copy_changes_nothing(model, name, tol):
    ids = ids_for(model)
    ref = stepwise(model, ids, DynamicCache())
    a = stepwise(model, ids, QuantKVCache(model, name))
    b = stepwise(model, ids, QuantKVCache(model, name, keep_decoded=True))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    err = float((a - ref).abs().max() / ref.abs().max())
    assert 0 < err < tol


def test_stored_bytes_are_what_the_format_counts(model):
    ids = ids_for(model)
    spec = parse_kv("kivi-k2v2-r16-g8")
    cache = QuantKVCache(model, spec)
    stepwise(model, ids, cache)
    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    stored = cache.layers[0].stored
    assert stored % 8 == 0 and 16 <= cache.layers[0].keys.shape[-2] < 24  # window R .. R+G-1
    assert cache.nbytes()["stored"] == layers * spec.bytes_per_token(heads, d) * stored


def test_float8_needs_calibrated_scales(model):
    ids = ids_for(model)
    with pytest.raises(LowbitError, match="calibration"):
        QuantKVCache(model, "fp8")
    for name in ("fp8", "fp8-head"):
        spec = parse_kv(name)
        scales = calibrate_kv(model, spec, ids_for(model, 64, 1))
        heads = model.config.num_key_value_heads
        assert scales[0][0].shape == ((heads,) if spec.per_head else ())
        got = stepwise(model, ids, QuantKVCache(model, spec, scales=scales))
        ref = stepwise(model, ids, DynamicCache())
        assert float((got - ref).abs().max() / ref.abs().max()) < 0.05


def test_transformers_generate_runs_with_it(model):
    ids = ids_for(model, 12)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    got = model.generate(ids, max_new_tokens=8, do_sample=False,
                         cache=QuantKVCache(model, "kivi-k8v8-r4096"))
    assert torch.equal(got, ref)


def test_eval_and_generate_from_the_command_line(tiny_ckpt, tmp_path):
    ckpt, text = tiny_ckpt
    out = tmp_path / "kv.json"
    lowbit_cli("eval", ckpt, "--data", text, "--windows", "2", "--seq-len", "48", "--kv",
               "int8,kivi-k2v2-r16-g8,kvquant-k2v2-r16-g8", "--json", out, "--quiet")
    rows = json.loads(out.read_text())
    assert [r["kv"] for r in rows] == ["int8", "kivi-k2v2-r16-g8", "kvquant-k2v2-r16-g8"]
    for r in rows:
        assert r["ppl"] > 1 and r["tokens"] == 2 * 24 and r["prefill"] == 24
        assert r["ppl_fp_cache"] == rows[0]["ppl_fp_cache"]
        assert 0 < r["kv_bytes_per_token"] < r["kv_fp16_bytes_per_token"] * 2
    gen = tmp_path / "g.json"
    lowbit_cli("generate", ckpt, "--prompt", "hello", "--max-new-tokens", "5", "--kv",
               "kivi-k4v4-r16-g8", "--json", gen)
    res = json.loads(gen.read_text())
    assert res["kv"] == "kivi-k4v4-r16-g8" and res["new_tokens"] >= 1
    for args, msg in ((["eval", ckpt, "--kv", "int3"], "unknown KV-cache format"),
                      (["generate", ckpt, "--prompt", "x", "--kv", "int8", "--compile"],
                       "--compile"),
                      (["eval", ckpt, "--kv", "fp16"], "quantized formats")):
        one_line_error(lowbit_cli(*args, ok=False), msg)


def test_windows_decoded_together_score_as_one_at_a_time(model):
    """Every scale is per window, so batching windows changes nothing but the speed; the
    prefilled tokens are not scored."""
    from lowbit.eval.kv import kv_evaluate

    windows = torch.cat([ids_for(model, 48, s) for s in range(3)])
    spec = parse_kv("kivi-k2v2-r8-g4")
    one = kv_evaluate(model, windows, spec, progress=False)
    together = kv_evaluate(model, windows, spec, progress=False, batch=2)
    assert one["tokens"] == together["tokens"] == 3 * 24
    for k in ("ppl", "ppl_fp_cache", "same_top_p", "kv_bytes_per_token",
              "kv_stored_bytes_per_token"):
        assert together[k] == pytest.approx(one[k], rel=1e-5), k
    # a batched product sums in another order: KL (small differences of log-probabilities)
    # moves in its fourth digit
    assert together["kld_mean"] == pytest.approx(one["kld_mean"], rel=1e-3)
    assert one["ppl"] != one["ppl_fp_cache"]


def test_a_head_rotation_spreads_an_outlier_channel():
    """``-h`` (QuaRot's R3): keys stored as ``k R`` and decoded as ``k_hat R^T`` with an
    orthogonal R of the head size; with a few outlier channels (as real keys have), per-token
    4-bit keys round about twice as well after the rotation, at the same stored bytes."""
    from lowbit.formats.kv import head_rotation
    from lowbit.runtime.kvcache import QuantKVLayer

    r = head_rotation(64)
    torch.testing.assert_close(r @ r.T, torch.eye(64), rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 96, 64, generator=g)
    k[..., [3, 40]] *= 30  # two outlier channels
    v = torch.randn(1, 2, 96, 64, generator=g)
    errs, sizes = {}, {}
    for name in ("pertoken-k4v4-r0", "pertoken-k4v4-r0-h"):
        layer = QuantKVLayer(parse_kv(name), keep_decoded=True)
        layer.update(k, v)
        assert layer.stored == 96
        errs[name] = float((layer.dk - k).norm() / k.norm())
        sizes[name] = sum(b.nbytes() for b in layer.k_blocks + layer.v_blocks)
        assert float((layer.dv - v).norm() / v.norm()) < 0.12
    assert errs["pertoken-k4v4-r0-h"] < errs["pertoken-k4v4-r0"] / 1.6  # measured: 2.1x
    assert sizes["pertoken-k4v4-r0-h"] == sizes["pertoken-k4v4-r0"]
