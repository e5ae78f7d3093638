"""Structured pruning of MLP channels: the refit against least squares on the inputs
themselves, the parameter count, the smaller model through save/reload and transformers, and
the command line."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from cli_helpers import lowbit_cli, one_line_error
from conftest import save_tiny_llama, tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.native import load_quantized
from lowbit.io.serving import load_checkpoint
from lowbit.methods.gptq import GPTQ
from lowbit.methods.rotate import Rotate
from lowbit.methods.structured import PruneStructured, channel_scores, refit


def test_refit_is_least_squares_on_the_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 48, generator=g) @ (torch.eye(48) + 0.3 * torch.randn(48, 48,
                                                                                generator=g))
    w = torch.randn(16, 48, generator=g)
    keep = torch.zeros(48, dtype=torch.bool)
    keep[::2] = True
    h = x.T @ x / len(x)
    ours = refit(w, h, keep, damp=0.0)
    ref = torch.linalg.lstsq(x[:, keep].double(), (x @ w.T).double()).solution.T
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-4)
    out = x @ w.T
    assert (x[:, keep] @ ours.T - out).norm() < 0.9 * (x[:, keep] @ w[:, keep].T - out).norm()


def test_channel_scores_weigh_columns_by_input_energy():
    w = torch.ones(4, 3)
    w[:, 1] = 2
    assert channel_scores(w, torch.tensor([1.0, 1.0, 0.1])).argsort().tolist() == [2, 0, 1]


def test_smaller_model_runs_saves_and_reloads(windows, tmp_path):
    m = tiny_model("llama")
    before = sum(p.numel() for p in m.parameters())
    res = lowbit.quantize(m, [PruneStructured(ratio=0.25)], windows, progress=False)
    head = next(r for r in res.rows if "parameters_after" in r)
    after = sum(p.numel() for p in m.parameters())
    assert head["parameters"] == before and head["parameters_after"] == after
    assert 0.15 < 1 - after / before <= 0.25  # at most the ratio (k rounded up)
    assert m.config.intermediate_size == 64 == m.model.layers[1].mlp.up_proj.out_features
    assert m.model.layers[1].mlp.down_proj.weight.shape == (64, 64)
    rows = [r for r in res.rows if "output_error" in r]
    assert len(rows) == 2 and all(0 < r["output_error"] < 1 for r in rows)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
    lowbit.save(tmp_path / "s", m, None, res)
    back, _ = load_quantized(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref)


def test_refused(windows):
    with pytest.raises(LowbitError, match="in \\(0, 1\\)"):
        PruneStructured(ratio=1.5)
    with pytest.raises(LowbitError, match="give a smaller ratio"):
        lowbit.quantize(tiny_model("llama"), [PruneStructured(ratio=0.9)], windows,
                        progress=False)
    with pytest.raises(LowbitError, match="gpt2 MLPs are not supported"):
        lowbit.quantize(tiny_model("gpt2"), [PruneStructured()], windows, progress=False)
    with pytest.raises(LowbitError, match="run-time rotation"):
        lowbit.quantize(tiny_model("llama"), [Rotate(online=True), PruneStructured(),
                                              GPTQ(scheme="w4g32")], windows, progress=False)
    with pytest.raises(LowbitError, match="keeps 72 inputs"):
        lowbit.quantize(tiny_model("llama"), [PruneStructured(ratio=0.2), GPTQ(scheme="w4g32")],
                        windows, progress=False)


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint's tokenizer on a model whose MLPs hold a good share of it."""
    src, text = tiny_ckpt
    tok = tf.AutoTokenizer.from_pretrained(src)
    return save_tiny_llama(tmp_path_factory.mktemp("wide"), tok, intermediate_size=2048), text


def test_cli_structured_then_gptq_is_an_ordinary_checkpoint(tmp_path, wide_ckpt):
    ckpt, text = wide_ckpt
    out = tmp_path / "small-w4"
    r = lowbit_cli("quantize", ckpt, "--prune-structured", 0.1, "--scheme", "w4g64",
                   "--calib", text, "--calib-samples", 8, "--seq-len", 64, "--out", out,
                   "--quiet")
    assert "MLP channels: 1024 of 2048 kept per block" in r.out
    assert "(compressed-tensors)" in r.out
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.intermediate_size == 1024
    ours, _ = load_checkpoint(out)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)


def test_cli_structured_alone(tmp_path, wide_ckpt):
    ckpt, text = wide_ckpt
    out = tmp_path / "small"
    r = lowbit_cli("quantize", ckpt, "--method", "none", "--prune-structured", 0.1,
                   "--calib", text, "--calib-samples", 8, "--seq-len", 64, "--out", out,
                   "--quiet", "--eval", 2)
    assert "(native): prune-structured, in full precision" in r.out and "eval on" in r.out
    back, _ = load_quantized(out)
    assert back.model.layers[0].mlp.gate_proj.weight.shape == (1024, 64)
    one_line_error(lowbit_cli("quantize", ckpt, "--method", "none", "--prune-structured", 0.9,
                              "--calib", text, "--out", tmp_path / "x", ok=False),
                   "give a smaller ratio")
