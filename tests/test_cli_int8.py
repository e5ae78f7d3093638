"""lowbit quantize with the activation-aware methods, reload and eval; lowbit inspect."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as tf

from lowbit.io.native import load_quantized
from lowbit.runtime.int8_mixed import Int8MixedLinear
from lowbit.runtime.w8a8 import W8A8Linear


def run(*args, ok=True):
    p = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=600
    )
    if ok:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a tiny word-level tokenizer, and a calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(200)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    text = d / "calib.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, 200, (6000,), generator=g)))
    return d, text


@pytest.mark.slow  # three quantize + eval subprocesses: minutes on the 2-core machine
@pytest.mark.parametrize(
    "method,extra,cls",
    [("smoothquant", ["--scheme", "w8a8-static", "--alpha", "0.6"], W8A8Linear),
     ("llm-int8", ["--threshold", "2.0"], Int8MixedLinear),
     ("awq", ["--scheme", "w4g32"], None)],
)
def test_quantize_reload_eval(tiny, tmp_path, method, extra, cls):
    ckpt, text = tiny
    out = tmp_path / "q"
    run("quantize", str(ckpt), "--method", method, *extra, "--calib", str(text),
        "--calib-samples", "8", "--calib-offset", "20", "--seq-len", "64",
        "--int8-kernel", "emulate", "--out", str(out), "--quiet",
        "--json", str(tmp_path / "s.json"))
    desc = json.loads((out / "lowbit.json").read_text())
    assert desc["method"] == method
    model, _ = load_quantized(out)
    if cls is not None:
        mods = [m for m in model.modules() if isinstance(m, cls)]
        assert len(mods) == 14
    if method == "smoothquant":
        assert (out / "act_stats.safetensors").is_file()
        assert desc["recipe"]["alpha"] == 0.6
    p = run("eval", str(out), "--data", str(text), "--windows", "4", "--seq-len", "64", "--quiet")
    assert "ppl" in p.stdout


def test_bad_options(tiny, tmp_path):
    ckpt, text = tiny
    p = run("quantize", str(ckpt), "--method", "rtn", "--scheme", "w4g32", "--alpha", "0.5",
            "--out", str(tmp_path / "x"), ok=False)
    assert p.returncode == 2 and "alpha" in p.stderr
    p = run("quantize", str(ckpt), "--method", "smoothquant", "--scheme", "w4g32",
            "--out", str(tmp_path / "y"), ok=False)
    assert p.returncode == 2 and "w8a8" in p.stderr


def test_inspect(tiny, tmp_path):
    ckpt, text = tiny
    png = tmp_path / "c.png"
    p = run("inspect", str(ckpt), "--calib", str(text), "--calib-samples", "8", "--seq-len",
            "64", "--ratio", "3", "--plot", str(png), "--save-stats", str(tmp_path / "s.st"),
            "--json", str(tmp_path / "o.json"), "--quiet")
    assert "block   0" in p.stdout and png.stat().st_size > 1000
    rows = json.loads((tmp_path / "o.json").read_text())
    assert len(rows) == 2 * 4  # one row per shared input per block
    p2 = run("inspect", str(ckpt), "--stats", str(tmp_path / "s.st"), "--ratio", "3", "--quiet")
    assert p2.stdout == p.stdout.replace(f"wrote {png}\n", "")
