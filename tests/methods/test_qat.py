"""End-to-end distillation (``--method qat``): a trained tiny model ends closer to its float
self than the RTN start it began from, on integer and ternary grids; the stored weights are on
the grid with learned scales; an interrupted run resumes to the same result; the command line
runs it and refuses what it cannot do."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cli_helpers import lowbit_cli, one_line_error
from conftest import tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.grids import get_grid
from lowbit.methods.awq import AWQ
from lowbit.methods.qat import QAT
from lowbit.methods.rtn import RTN, rtn
from lowbit.pipeline.checkpoint import RunCheckpoint

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
HELD = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def mean_kl(model, ref):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=HELD).logits.float(), -1)
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


@pytest.fixture(scope="module")
def base():
    model = tiny_model("llama")
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=HELD).logits.float(), -1)
    return model, ref


@pytest.mark.parametrize("scheme, train, tokens, lr", [
    ("w3g32", "weights", 32 * 30, 2e-3),
    ("w3g32", "scales", 32 * 30, 2e-3),
    ("w3g32a6", "weights", 32 * 30, 2e-3),  # per-token activations rounded while training
    pytest.param("ternary", "weights", 32 * 60, 2e-2, marks=pytest.mark.slow),
    pytest.param("nf4", "weights", 32 * 30, 2e-3, marks=pytest.mark.slow),
])
def test_distillation_beats_its_rtn_start(base, scheme, train, tokens, lr):
    model0, ref = base
    rtn_model = copy.deepcopy(model0)
    lowbit.quantize(rtn_model, [RTN(scheme=scheme)], None, progress=False)
    model = copy.deepcopy(model0)
    name = "model.layers.1.mlp.down_proj"
    w = model.get_submodule(name).weight.detach().clone()
    res = lowbit.quantize(model, [QAT(scheme=scheme, tokens=tokens, train=train, lr=lr)],
                          CALIB, progress=False)
    rows = [r for r in res.rows if r.get("step") == "qat"]
    assert len(rows) == 14 and rows[0]["tokens_trained"] == tokens
    assert rows[0]["kl_end"] < rows[0]["kl_start"]
    assert mean_kl(model, ref) < mean_kl(rtn_model, ref)
    gw = res.weights[name]
    if scheme in ("ternary", "nf4"):  # training moved codes away from the rounding of w
        assert not torch.equal(gw.codes, rtn(w, get_grid("ternary")).codes)
        return
    near = rtn(w, get_grid(scheme))
    moved = (gw.codes.int() - near.codes.int()).abs()
    assert 0 < float((moved > 0).float().mean()) < 0.5
    # the scales were learned (fp16, as stored) and the model computes what is stored
    assert not torch.equal(gw.params["scale"], near.params["scale"])
    torch.testing.assert_close(gw.params["scale"], gw.params["scale"].half().float(), rtol=0,
                               atol=0)


@pytest.mark.parametrize("scheme", ["w4g32", "w3g32-asym", "w4", "ternary", "nf4", "mxfp4"])
def test_frozen_weights_are_the_trained_ones(scheme):
    """What is stored decodes to exactly the weight the student computed with (scales rounded
    to their stored dtype while training), whatever the learned offsets and scales."""
    from lowbit.methods.qat import _Student

    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 24)
    st = _Student(lin, lin.weight.data, get_grid(scheme), "weights")
    with torch.no_grad():
        st.v.normal_(0, 0.7)
        if st.u.numel():
            st.u.normal_(0, 0.1)
        trained = st.quantized()
    torch.testing.assert_close(st.freeze().dequantize(), trained, rtol=0, atol=0)


class _Stop(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_weights(base, tmp_path, monkeypatch):
    model0, _ = base
    step = QAT(scheme="w4g32", tokens=32 * 12, save_every=4)
    whole = lowbit.quantize(copy.deepcopy(model0), [step], CALIB, progress=False)
    adam_step = torch.optim.Adam.step
    calls = {"n": 0}

    def stop_after_six(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 6:
            raise _Stop
        return adam_step(self, *a, **k)

    model = copy.deepcopy(model0)
    with monkeypatch.context() as m:
        m.setattr(torch.optim.Adam, "step", stop_after_six)
        with pytest.raises(_Stop):
            lowbit.quantize(model, [step], CALIB, progress=False,
                            checkpoint=RunCheckpoint(tmp_path / "ck"))
    assert (tmp_path / "ck" / "qat-state.pt").is_file()
    notes = []
    again = lowbit.quantize(model, [step], CALIB, progress=False,
                            checkpoint=RunCheckpoint(tmp_path / "ck", note=notes.append))
    assert any("resuming at step 4 of 12" in n for n in notes)
    assert len(whole.weights) == 14
    for name in whole.weights:
        torch.testing.assert_close(again.weights[name].codes, whole.weights[name].codes, rtol=0,
                                   atol=0)


def test_a_batch_that_does_not_divide_the_windows(base):
    step = QAT(scheme="w4g32", tokens=32 * 3 * 7, batch=3)  # 8 windows, 7 steps of 3
    res = lowbit.quantize(copy.deepcopy(base[0]), [step], CALIB, progress=False)
    assert [r for r in res.rows if r.get("step") == "qat"][0]["tokens_trained"] == 32 * 21


@pytest.mark.slow
def test_the_command_line_keeps_training_it_could_not_finish(tiny_ckpt, tmp_path, monkeypatch):
    """Stopped part way (an error, Ctrl-C) the command keeps qat's saved state and says so, and
    the same command goes on from it; stopped after training, it goes on from the stored
    blocks; either way the output is the uninterrupted run's, byte for byte."""
    from lowbit.runtime import qlinear

    ckpt, text = tiny_ckpt
    recipe = tmp_path / "qat.yaml"
    recipe.write_text("steps:\n  - qat: {scheme: w4g32, tokens: 384, save_every: 3}\n")
    args = ["quantize", ckpt, "--recipe", recipe, "--calib", text, "--calib-samples", "4",
            "--calib-offset", "2", "--seq-len", "32", "--quiet"]
    lowbit_cli(*args, "--out", tmp_path / "whole")
    want = (tmp_path / "whole" / "model.safetensors").read_bytes()
    adam_step, real_init = torch.optim.Adam.step, qlinear.QLinear.__init__
    calls = {"adam": 0, "qlinear": 0}

    def stop_at_step_8(self, *a, **k):
        calls["adam"] += 1
        if calls["adam"] == 8:
            raise KeyboardInterrupt
        return adam_step(self, *a, **k)

    def stop_in_block_1(self, *a, **k):
        calls["qlinear"] += 1
        if calls["qlinear"] == 8:  # block 0's 7 Linears are stored
            raise KeyboardInterrupt
        return real_init(self, *a, **k)

    for stop, kept, resumed in ((stop_at_step_8, "training at step 6 of 12 is kept", None),
                                (stop_in_block_1, "1 finished blocks are kept", 1)):
        out = tmp_path / stop.__name__
        with monkeypatch.context() as m:
            m.setattr(torch.optim.Adam, "step", stop_at_step_8)
            if stop is stop_in_block_1:
                m.setattr(torch.optim.Adam, "step", adam_step)
                m.setattr(qlinear.QLinear, "__init__", stop_in_block_1)
            r = lowbit_cli(*args, "--out", out, ok=False)
        assert r.code != 0 and kept in r.err, r.err[-2000:]
        again = lowbit_cli(*args, "--out", out, "--json", "-")
        assert json.loads(again.out).get("resumed_blocks") == resumed
        assert "resuming at step" in again.err
        assert (out / "model.safetensors").read_bytes() == want
        assert not (tmp_path / f"{stop.__name__}.lowbit-resume").exists()


def test_qat_refuses_what_it_cannot_train(base):
    with pytest.raises(LowbitError, match="not a grid qat trains"):
        QAT(scheme="fp8-e4m3")
    with pytest.raises(LowbitError, match="one scale for the tensor"):
        QAT(scheme="w8-tensor")
    with pytest.raises(LowbitError, match="train=scales is for integer grids"):
        QAT(scheme="nf4", train="scales")
    with pytest.raises(LowbitError, match="train must be one of"):
        QAT(train="lora")
    with pytest.raises(LowbitError, match="train=scales is for integer grids"):
        QAT(scheme="ternary", train="scales")
    with pytest.raises(LowbitError, match="awq changes each block"):
        lowbit.quantize(copy.deepcopy(base[0]), [AWQ(), QAT(tokens=32)], CALIB, progress=False)


def test_qat_from_the_command_line(tiny_ckpt, tmp_path):
    ckpt, text = tiny_ckpt
    out = tmp_path / "qat"
    r = lowbit_cli("quantize", ckpt, "--method", "qat", "--scheme", "w4g32", "--tokens", "0.2K",
                   "--calib", text, "--calib-samples", "4", "--calib-offset", "2",
                   "--seq-len", "32", "--out", out)
    assert "qat" in r.err  # the progress bar: tokens, tokens/s, ETA
    step = json.loads((out / "lowbit.json").read_text())["recipe"]["steps"][0]
    assert (step["step"], step["tokens"], step["scheme"]) == ("qat", 200, "w4g32")
    assert not (tmp_path / "qat.lowbit-resume").exists()
    lowbit_cli("eval", out, "--data", text, "--windows", "2", "--seq-len", "32")
    one_line_error(lowbit_cli("quantize", ckpt, "--method", "gptq", "--tokens", "2M", "--out",
                              tmp_path / "x", ok=False), "--tokens is for qat")
    one_line_error(lowbit_cli("quantize", ckpt, "--method", "qat", "--tokens", "lots", "--out",
                              tmp_path / "y", ok=False), "is not a token count")
    one_line_error(lowbit_cli("quantize", ckpt, "--method", "qat", "--scheme", "sq4", "--out",
                              tmp_path / "z", ok=False), "not a grid qat trains")
