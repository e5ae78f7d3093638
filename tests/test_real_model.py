"""Heavier checks on the real default model (CI's second step: ``pytest -m slow``)."""

from pathlib import Path

import pytest
import torch
from driver_helpers import Visitor, last_block_output

import lowbit
from lowbit import data
from lowbit.arch import spec_for
from lowbit.eval.metrics import evaluate
from lowbit.io.native import load_quantized
from lowbit.models import load_model
from lowbit.pipeline.driver import run_sequential

pytestmark = pytest.mark.slow
WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


@pytest.fixture(scope="module")
def model_tok():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def wiki_ids(model_tok):
    return data.tokenize(model_tok[1], data.read_text(WIKI))


def test_protocol_base_perplexity(model_tok, wiki_ids):
    """PROTOCOL.md: fp32 base perplexity on the first 64 windows of 512 is 29.53."""
    res = evaluate(model_tok[0], data.windows(wiki_ids, 64, 512), progress=False)
    assert res["ppl"] == pytest.approx(29.53, abs=0.01)


def test_driver_reproduces_real_model(wiki_ids):
    model, _ = load_model("smollm2-135m")
    w = data.windows(wiki_ids, 2, 256)
    ref = last_block_output(model, w)
    out = run_sequential(model, spec_for(model), w, Visitor(lambda *a: None), chunk=1,
                         progress=False)
    assert torch.allclose(torch.cat(out.hidden), ref, atol=1e-3, rtol=1e-4)


def test_gptq_beats_rtn_and_reloads(tmp_path, wiki_ids):
    ev = data.windows(wiki_ids, 4, 512)
    cal = data.windows(wiki_ids, 16, 512, start=100)
    rtn, tok = load_model("smollm2-135m")
    lowbit.quantize(rtn, [lowbit.RTN(scheme="w3g64")], progress=False)
    gptq, _ = load_model("smollm2-135m")
    res = lowbit.quantize(gptq, [lowbit.GPTQ(scheme="w3g64")], cal, progress=False)
    below = sum(r["loss"] < r["rtn_loss"] for r in res.rows)
    assert below >= 0.95 * len(res.rows)  # measured against the weight before rounding
    p_rtn = evaluate(rtn, ev, progress=False)["ppl"]
    p_gptq = evaluate(gptq, ev, progress=False)["ppl"]
    assert p_gptq < 0.8 * p_rtn
    out = lowbit.save(tmp_path / "q", gptq, tok, res)
    back, _ = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(gptq(input_ids=ev[:1]).logits, back(input_ids=ev[:1]).logits)


def test_demo_end_to_end(tmp_path):
    """`lowbit demo` (small sizes): the table's rows (base, RTN, GPTQ), the JSON, a folder that
    reloads."""
    import json
    import subprocess
    import sys

    from lowbit.cli.demo import DEMO_SCHEME

    out, js = tmp_path / "demo", tmp_path / "demo.json"
    p = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "demo", "--calib-samples", "4", "--windows", "2",
         "--out", str(out), "--json", str(js)],
        capture_output=True, text=True, timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"quantized model written to {out}" in p.stdout
    base, rtn, q = json.loads(js.read_text())["rows"]
    assert (base["method"], rtn["method"], q["method"]) == ("base", "rtn", "gptq")
    assert rtn["scheme"] == q["scheme"] == DEMO_SCHEME
    assert q["kl_mean"] < rtn["kl_mean"]
    assert 4.0 < q["bpw"] < 4.5 and q["kl_mean"] > 0 and 0 < q["top1"] < 1
    assert base["ppl"] < q["ppl"] < 2 * base["ppl"]
    from lowbit.runtime.qlinear import QLinear

    back, _ = load_model(out)  # compressed-tensors: the demo's recipe fits it
    assert sum(isinstance(m, QLinear) for m in back.modules()) == 210


def test_pruning_orderings_of_the_wanda_paper(wiki_ids):
    """On the real model, as in the Wanda paper's table: at 2:4, Wanda and SparseGPT are far
    ahead of magnitude pruning, and SparseGPT's weight update puts it ahead of Wanda."""
    from lowbit.methods.prune import Prune

    ev = data.windows(wiki_ids, 4, 512)
    cal = data.windows(wiki_ids, 16, 512, start=100)
    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model, _ = load_model("smollm2-135m")
        lowbit.quantize(model, [Prune(method=method, sparsity="2:4")], cal, progress=False)
        ppl[method] = evaluate(model, ev, progress=False)["ppl"]
    assert ppl["sparsegpt"] < ppl["wanda"] < 0.5 * ppl["magnitude"], ppl
