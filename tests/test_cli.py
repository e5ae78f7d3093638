"""The command line, end to end on a tiny checkpoint, and its one-line errors."""

import json
import subprocess
import sys

import pytest
import transformers as tf

WIKI = "../shared/data/wikitext-2-raw/wiki.test.raw"


def run(*args, ok=True):
    p = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=600
    )
    if ok:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Llama with the built-in model's tokenizer, saved as a checkpoint folder."""
    from lowbit.models import load_model

    _, tok = load_model("smollm2-135m")
    cfg = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    d = tmp_path_factory.mktemp("tiny")
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    text = d / "calib.txt"
    text.write_text(
        "\n".join(
            f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(3000)
        )
    )
    return d, text


def test_quantize_info_eval(tiny_ckpt, tmp_path):
    ckpt, text = tiny_ckpt
    out = tmp_path / "q"
    run(
        "quantize",
        str(ckpt),
        "--method",
        "gptq",
        "--scheme",
        "w4g32",
        "--calib",
        str(text),
        "--calib-samples",
        "4",
        "--seq-len",
        "64",
        "--out",
        str(out),
        "--json",
        str(tmp_path / "q.json"),
        "--quiet",
        "--act-order",
        "--calib-offset",
        "8",
    )
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["layers"] == 14 and q["layers_below_rtn"] == 14
    assert q["bits_per_weight"] == pytest.approx(4.5 + 32 / 128, rel=0.2)
    rows = [json.loads(line) for line in (out / "layers.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and {"name", "shape", "tokens", "loss", "seconds"} <= set(rows[0])
    info = run("info", str(out))
    assert "gptq w4g32" in info.stdout
    ev = run(
        "eval",
        str(out),
        "--data",
        str(text),
        "--windows",
        "4",
        "--seq-len",
        "64",
        "--base",
        str(ckpt),
        "--json",
        str(tmp_path / "e.json"),
        "--quiet",
        "--speed",
    )
    e = json.loads((tmp_path / "e.json").read_text())
    assert {"ppl", "kl_mean", "kl_p99", "top1", "decode_tok_s", "model_bytes"} <= set(e)
    assert e["kl_mean"] > 0 and 0 < e["top1"] <= 1
    assert "ppl" in ev.stdout
    # evaluating on the calibration windows of the same text is refused
    bad = run("eval", str(out), "--data", str(text), "--windows", "12", "--seq-len", "64", ok=False)
    assert bad.returncode == 2 and "overlap" in bad.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize", "no/such/model", "--out", "x"], "model not found"),
        (["quantize", "smollm2-135m", "--scheme", "w4q", "--out", "x"], "unknown scheme"),
        (
            [
                "quantize",
                "smollm2-135m",
                "--scheme",
                "w4g128",
                "--method",
                "rtn",
                "--out",
                "{tmp}/o",
            ],
            "group size 128 does not divide the input dimension 576",
        ),
        (
            ["quantize", "smollm2-135m", "--calib", "{tmp}/empty.txt", "--out", "{tmp}/o"],
            "holds no text",
        ),
        (
            ["quantize", "smollm2-135m", "--calib", "{tmp}/short.txt", "--out", "{tmp}/o"],
            "too short",
        ),
        (["quantize", "smollm2-135m", "--method", "rtn", "--out", "/proc/forbidden/o"], "cannot"),
        (["quantize", "smollm2-135m", "--method", "awq9", "--out", "{tmp}/o"], "unknown method"),
        (
            ["quantize", "{tmp}/bert", "--method", "rtn", "--out", "{tmp}/o"],
            "unsupported model family 'bert'",
        ),
        (["eval", "{tmp}/bert", "--windows", "2"], "beyond the model's vocabulary"),
        (["info", "{tmp}"], "lowbit.json"),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("just a few words")
    if any("bert" in a for a in args):
        cfg = tf.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            is_decoder=True,
        )
        tf.BertLMHeadModel(cfg).save_pretrained(tmp_path / "bert")
        from lowbit.models import load_model

        load_model("smollm2-135m")[1].save_pretrained(tmp_path / "bert")
    p = run(*[a.replace("{tmp}", str(tmp_path)) for a in args], ok=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert message in lines[0]
