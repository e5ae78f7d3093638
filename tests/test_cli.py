"""The command line, end to end on a tiny checkpoint: quantize -> info -> eval, recipes,
re-runs from lowbit.json, the int8 methods, inspect, and one-line errors."""

import json

import pytest
import torch
import transformers as tf
from cli_helpers import lowbit_cli, lowbit_process, one_line_error
from safetensors.torch import load_file

from lowbit.models import load_model
from lowbit.runtime.int8_mixed import Int8MixedLinear
from lowbit.runtime.qlinear import QLinear
from lowbit.runtime.w8a8 import W8A8Linear

SMALL = ["--calib-samples", "4", "--seq-len", "64", "--quiet"]


def test_quantize_info_eval(tiny_ckpt, tmp_path):
    ckpt, text = tiny_ckpt
    out = tmp_path / "q"
    lowbit_cli("quantize", ckpt, "--method", "gptq", "--scheme", "w4g32", "--calib", text,
               *SMALL, "--out", out, "--json", tmp_path / "q.json", "--act-order",
               "--calib-offset", "8")
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["layers"] == 14 and q["layers_below_rtn"] == 14 and q["schemes"] == {"w4g32": 14}
    assert q["bits_per_weight"] == pytest.approx(4.5 + 32 / 128, rel=0.2)
    assert q["recipe"]["steps"][0] | {"scheme": "w4g32", "act_order": True} == \
        q["recipe"]["steps"][0]
    rows = [json.loads(line) for line in (out / "layers.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and {"name", "shape", "tokens", "loss", "seconds"} <= set(rows[0])
    info = lowbit_cli("info", out)
    assert "gptq w4g32" in info.out and "recipe: gptq w4g32" in info.out
    e = json.loads(lowbit_cli("eval", out, "--data", text, "--windows", "4", "--seq-len", "64",
                              "--base", ckpt, "--json", "-", "--quiet", "--speed").out)
    assert {"ppl", "kl_mean", "kl_p99", "top1", "prefill_tokens_per_s", "decode_tokens_per_s",
            "peak_rss_mb", "model_bytes", "kld_median", "kld_p99", "kld_p999", "same_top_p",
            "rms_dp", "ppl_base", "ppl_ratio"} <= set(e)
    assert e["kernel"] == {"lut4": 14} and e["speed_prompt_tokens"] == 64
    assert e["kernel_by_layer"]["mlp.down_proj"] == "lut4" and len(e["kernel_by_layer"]) == 7
    assert e["kl_mean"] > 0 and 0 < e["top1"] <= 1 and e["scheme"] == "w4g32"
    a8 = json.loads(lowbit_cli("eval", out, "--data", text, "--windows", "4", "--seq-len", "64",
                               "--json", "-", "--quiet", "--speed", "--kernel", "auto-a8").out)
    assert a8["kernel"] == {"int4-a8": 14} and a8["ppl"] == e["ppl"]  # windows: dense products
    # evaluating on the calibration windows of the same text is refused
    bad = lowbit_cli("eval", out, "--data", text, "--windows", "12", "--seq-len", "64", ok=False)
    one_line_error(bad, "overlap")


def test_analyze_then_quantize_to_a_budget(tiny_ckpt, tmp_path):
    """lowbit analyze measures every block Linear; quantize --target-bpw turns the measurement
    into a recipe of overrides whose stored bytes meet the budget, recorded in lowbit.json."""
    ckpt, text = tiny_ckpt
    sens_path = tmp_path / "sens.json"
    r = lowbit_cli("analyze", ckpt, "--schemes", "w2g32,w4g32,w8", "--calib", text,
                   "--calib-samples", "2", "--seq-len", "32", "--json", sens_path,
                   "--plot", tmp_path / "sens.png", "--quiet")
    sens = json.loads(sens_path.read_text())
    assert len(sens["layers"]) == 14 and sens["base_model"] == str(ckpt)
    assert (tmp_path / "sens.png").stat().st_size > 0 and "Spearman" in r.out
    out = tmp_path / "mixed"
    q = json.loads(lowbit_cli("quantize", ckpt, "--method", "rtn", "--target-bpw", "4",
                              "--sensitivity", sens_path, "--out", out, "--json", "-",
                              "--quiet").out)
    assert q["bits_per_weight"] <= 4.0 and len(q["schemes"]) >= 2
    assert q["storage_bytes"] == q["budget"]["bytes"] <= q["budget"]["target_bytes"]
    recorded = json.loads((out / "lowbit.json").read_text())["recipe"]["steps"][0]
    assert recorded["overrides"] and sum(q["schemes"].values()) == 14
    # measured inline when no file is given
    q2 = json.loads(lowbit_cli("quantize", ckpt, "--method", "rtn", "--target-size", "30kB",
                               "--candidates", "w2g32,w4g32", "--calib", text, "--out",
                               tmp_path / "m2", "--json", "-", "--quiet").out)
    assert q2["storage_bytes"] <= 30000 and set(q2["schemes"]) <= {"w2g32", "w4g32"}
    assert q2["budget"]["measured_with"] == "rtn"
    # a GPTQ recipe is measured as GPTQ rounds it, with its own calibration's Hessians
    q3 = json.loads(lowbit_cli("quantize", ckpt, "--method", "gptq", "--target-bpw", "3",
                               "--candidates", "w2g32,w4g32", "--calib", text,
                               "--calib-samples", "2", "--seq-len", "32", "--out",
                               tmp_path / "m3", "--json", "-", "--quiet").out)
    assert q3["budget"]["measured_with"] == "gptq" and q3["bits_per_weight"] <= 3.0


def test_analyze_with_the_rounder_the_recipe_uses(tiny_ckpt):
    """``--method gptq``: the candidates are rounded by GPTQ with input statistics from
    ``--hessian-samples`` windows of 512 tokens, or of the model's context when it is shorter;
    a rounder that does not exist is a one-line error."""
    ckpt, text = tiny_ckpt
    sens = json.loads(lowbit_cli("analyze", ckpt, "--schemes", "w2g32,w4g32", "--method", "gptq",
                                 "--hessian-samples", "2", "--calib", text, "--calib-samples",
                                 "2", "--seq-len", "32", "--json", "-", "--quiet").out)
    positions = tf.AutoConfig.from_pretrained(ckpt).max_position_embeddings
    n = sens["hessian_calibration"]["seq_len"]
    assert sens["method"] == "gptq" and n == min(512, positions) and sens["calib_tokens"] == 2 * n
    one_line_error(lowbit_cli("analyze", ckpt, "--method", "awq", "--calib", text, ok=False),
                   "unknown rounding method 'awq'")


def test_analyze_llamacpp_types_then_export_gguf_to_a_budget(tiny_ckpt, tmp_path):
    """Candidates named as llama.cpp types are measured in the type llama-quantize would store
    (Q4_K -> Q5_0 on 64-column rows); export --target-bpw writes each block Linear in its chosen
    type (read back with the gguf package) and the same choice as a --tensor-type-file."""
    import re

    from gguf import GGUFReader

    ckpt, text = tiny_ckpt
    sens_path = tmp_path / "sens.json"
    lowbit_cli("analyze", ckpt, "--schemes", "Q4_0,Q4_K,Q8_0", "--calib", text,
               "--calib-samples", "2", "--seq-len", "32", "--json", sens_path, "--quiet")
    sens = json.loads(sens_path.read_text())
    row = sens["layers"]["model.layers.0.mlp.down_proj"]
    assert row["schemes"]["Q4_K"]["type"] == "Q5_0" and row["schemes"]["Q8_0"]["type"] == "Q8_0"
    assert row["schemes"]["Q4_0"]["bytes"] == row["numel"] // 32 * 18
    out = tmp_path / "mixed.gguf"
    r = json.loads(lowbit_cli("export", ckpt, out, "--type", "Q4_0", "--target-bpw", "6.5",
                              "--sensitivity", sens_path, "--json", "-", "--quiet").out)
    lines = (tmp_path / "mixed.tensor-types.txt").read_text().splitlines()
    assert r["allocation"]["tensor_type_file"] == str(tmp_path / "mixed.tensor-types.txt")
    want = {}
    for line in lines:
        m = re.fullmatch(r"\^(.+)\$=(q\d_\d|q\d_k)", line)
        assert m, line
        want[m.group(1).replace("\\", "")] = m.group(2).upper()
    assert len(want) == 14 and len(set(want.values())) >= 2
    got = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert all(got[n] == t for n, t in want.items())
    nbytes = sum(int(t.n_bytes) for t in GGUFReader(out).tensors if t.name in want)
    assert nbytes <= 6.5 * sum(r["numel"] for r in sens["layers"].values()) / 8
    bad = lowbit_cli("export", ckpt, tmp_path / "x.gguf", "--target-bpw", "5", ok=False)
    one_line_error(bad, "takes --sensitivity")
    w_only = tmp_path / "w.json"
    lowbit_cli("analyze", ckpt, "--schemes", "w4g32,w8", "--calib", text, "--calib-samples",
               "1", "--seq-len", "16", "--json", w_only, "--quiet")
    bad = lowbit_cli("export", ckpt, tmp_path / "y.gguf", "--target-bpw", "5", "--sensitivity",
                     w_only, ok=False)
    one_line_error(bad, "no llama.cpp types among its candidates")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("scheme", ["nf4", "mxfp4", "w4g32-asym"])
def test_non_integer_schemes_save_and_reload(tiny_ckpt, tmp_path, scheme):
    """`lowbit quantize --method rtn --scheme nf4` crashed after the whole run (issue 13)."""
    ckpt, _ = tiny_ckpt
    out = tmp_path / "q"
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", scheme, "--out", out, "--quiet")
    model, _ = load_model(out)
    mods = [m for m in model.modules() if isinstance(m, QLinear)]
    assert len(mods) == 14 and all(m.grid.name == scheme for m in mods)
    assert scheme in lowbit_cli("info", out).out


RECIPE = """
steps:
  - gptq:
      scheme: w4g32
      ignore: []
      overrides:
        're:.*layers\\.0\\..*down_proj': w8
        lm_head: w8
calibration: {samples: 4, seq_len: 64}
"""


def test_recipe_file_then_rerun_from_lowbit_json(tiny_ckpt, tmp_path):
    ckpt, text = tiny_ckpt
    (tmp_path / "r.yaml").write_text(RECIPE)
    a = tmp_path / "a"
    lowbit_cli("quantize", ckpt, "--recipe", tmp_path / "r.yaml", "--calib", text, "--quiet",
               "--out", a)
    desc = json.loads((a / "lowbit.json").read_text())
    assert desc["version"] == 2 and desc["method"] == "gptq"
    assert desc["layers"]["model.layers.0.mlp.down_proj"]["grid"] == "w8"
    assert desc["layers"]["lm_head"]["grid"] == "w8"
    assert desc["layers"]["model.layers.1.mlp.down_proj"]["grid"] == "w4g32"
    assert desc["calibration"]["windows"] == 4 and desc["calibration"]["seq_len"] == 64
    # the recorded recipe re-runs, from the recorded base model and calibration, to the same
    # tensors
    b = tmp_path / "b"
    lowbit_cli("quantize", "--recipe", a / "lowbit.json", "--quiet", "--out", b)
    assert desc["format"] == "compressed-tensors"  # several schemes: one config group each
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    info = lowbit_cli("info", b)
    assert "13 w4g32, 2 w8" in info.out
    r = lowbit_cli("quantize", ckpt, "--recipe", a / "lowbit.json", "--scheme", "w8",
                   "--out", tmp_path / "c", ok=False)
    one_line_error(r, "--recipe gives the steps; drop --scheme")


@pytest.fixture(scope="module")
def word_ckpt(tmp_path_factory):
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


@pytest.mark.parametrize(
    "method,extra,cls",
    [("smoothquant", ["--scheme", "w8a8-static", "--alpha", "0.6"], W8A8Linear),
     ("llm-int8", ["--threshold", "2.0"], Int8MixedLinear),
     ("awq", ["--scheme", "w4g32"], QLinear)],
)
def test_activation_aware_methods(word_ckpt, tmp_path, method, extra, cls):
    ckpt, text = word_ckpt
    out = tmp_path / "q"
    kernel = ["--int8-kernel", "emulate"] if method != "awq" else []
    lowbit_cli("quantize", ckpt, "--method", method, *extra, "--calib", text,
               "--calib-samples", "8", "--calib-offset", "20", "--seq-len", "64", *kernel,
               "--out", out, "--quiet")
    desc = json.loads((out / "lowbit.json").read_text())
    assert desc["method"] == {"awq": "awq+rtn"}.get(method, method.replace("smoothquant",
                                                                            "smoothquant+w8a8"))
    model, _ = load_model(out)
    assert len([m for m in model.modules() if isinstance(m, cls)]) == 14
    if method == "smoothquant":
        # the serving checkpoint's shards are the model's only; statistics stay in native
        assert not (out / "act_stats.safetensors").exists()
        assert desc["recipe"]["steps"][0]["alpha"] == 0.6
    p = lowbit_cli("eval", out, "--data", text, "--windows", "4", "--seq-len", "64", "--quiet")
    assert "ppl" in p.out


def test_inspect(word_ckpt, tmp_path):
    ckpt, text = word_ckpt
    png = tmp_path / "c.png"
    p = lowbit_cli("inspect", ckpt, "--calib", text, "--calib-samples", "8", "--seq-len", "64",
                   "--ratio", "3", "--plot", png, "--save-stats", tmp_path / "s.st",
                   "--json", tmp_path / "o.json", "--quiet")
    assert "block   0" in p.out and png.stat().st_size > 1000
    rows = json.loads((tmp_path / "o.json").read_text())
    assert len(rows) == 2 * 4  # one row per shared input per block
    p2 = lowbit_cli("inspect", ckpt, "--stats", tmp_path / "s.st", "--ratio", "3", "--quiet")
    assert p2.out == p.out.replace(f"wrote {png}\n", "")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "rtn", "--scheme", "w4g32", "--alpha", "0.5"],
         "--alpha is for smoothquant, smoothquant+gptq; rtn does not take it"),
        (["--method", "gptq", "--threshold", "4"], "--threshold is for llm-int8; gptq does not"),
        (["--method", "llm-int8", "--damp", "0.1"],
         "--damp is for awq+gptq, gptq, smoothquant+gptq; llm-int8"),
        (["--method", "rtn", "--act-order"],
         "--act-order is for awq+gptq, gptq, smoothquant+gptq; rtn"),
        (["--method", "smoothquant", "--scheme", "w4g32"], "w8a8 takes the schemes"),
        (["--method", "hqq", "--scheme", "nf4"], "hqq fits integer schemes"),
        (["--method", "rtn", "--calib-samples", "0"], "--calib-samples must be at least 1"),
        (["--method", "rtn", "--format", "onnx"], "unknown output format 'onnx'"),
        (["--recipe", "{tmp}/missing.yaml"], "cannot read recipe"),
        (["--method", "rtn", "--sensitivity", "{tmp}/s.json"], "give one of --target-bpw"),
        (["--method", "rtn", "--target-bpw", "3", "--target-size", "1MB"],
         "give one of --target-bpw"),
        (["--method", "rtn", "--target-size", "lots"], "is not a size"),
        (["--method", "rtn", "--target-bpw", "3", "--sensitivity", "{tmp}/missing.json"],
         "cannot read --sensitivity"),
        (["--method", "w8a8", "--target-bpw", "3", "--sensitivity", "{tmp}/s.json"],
         "one rounding step"),
    ],
)
def test_bad_options_fail_before_loading(word_ckpt, tmp_path, args, message):
    ckpt, _ = word_ckpt
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    (tmp_path / "s.json").write_text(json.dumps(
        {"format": "lowbit-sensitivity", "layers": {"a": {"numel": 64, "schemes": {
            "w4g32": {"bytes": 40, "kl": 0.1}}}}}))
    r = lowbit_cli("quantize", ckpt, *args, "--out", tmp_path / "x", ok=False)
    one_line_error(r, message)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize", "no/such/model", "--out", "x"], "model not found"),
        (["quantize", "smollm2-135m", "--scheme", "w4q", "--out", "x"], "unknown scheme"),
        (["quantize", "smollm2-135m", "--scheme", "w4g128", "--method", "rtn",
          "--out", "{tmp}/o"], "group size 128 does not divide the input dimension 576"),
        (["quantize", "smollm2-135m", "--calib", "{tmp}/empty.txt", "--out", "{tmp}/o"],
         "holds no text"),
        (["quantize", "smollm2-135m", "--calib", "{tmp}/short.txt", "--out", "{tmp}/o"],
         "too short"),
        (["quantize", "smollm2-135m", "--method", "rtn", "--out", "/proc/forbidden/o"],
         "cannot"),
        (["quantize", "smollm2-135m", "--method", "awq9", "--out", "{tmp}/o"],
         "unknown method"),
        (["quantize", "{tmp}/bert", "--method", "rtn", "--out", "{tmp}/o"],
         "unsupported model family 'bert'"),
        (["eval", "{tmp}/bert", "--windows", "2"], "beyond the model's vocabulary"),
        (["info", "{tmp}"], "lowbit.json"),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("just a few words")
    if any("bert" in a for a in args):
        cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64, is_decoder=True)
        tf.BertLMHeadModel(cfg).save_pretrained(tmp_path / "bert")
        from lowbit.models import load_model

        load_model("smollm2-135m")[1].save_pretrained(tmp_path / "bert")
    r = lowbit_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], ok=False)
    one_line_error(r, message)


def test_the_script_exits_with_the_code_and_one_line(tmp_path):
    """The installed entry point (a separate process): exit code 2, one line on stderr."""
    r = lowbit_process("quantize", "no/such/model", "--out", tmp_path / "x", ok=False)
    one_line_error(r, "model not found")
    assert lowbit_process("--help").out.count("quantize") >= 1


def test_hub_ids_resolve_from_the_cache(tiny_ckpt, tmp_path, monkeypatch):
    """``lowbit quantize org/name`` with the model in the Hugging Face cache, offline, as
    transformers resolves it (issue 14)."""
    import shutil

    from huggingface_hub import constants

    ckpt, _ = tiny_ckpt
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(ckpt, snap, ignore=shutil.ignore_patterns("*.txt"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "q"
    lowbit_cli("quantize", "someorg/tiny-llama", "--method", "rtn", "--scheme", "w4g32",
               "--out", out, "--quiet")
    assert json.loads((out / "lowbit.json").read_text())["recipe"]
    missing = lowbit_cli("quantize", "someorg/other", "--method", "rtn", "--out",
                         tmp_path / "x", ok=False)
    one_line_error(missing, "not in the Hugging Face cache")


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint saved in bf16 (config.json dtype bfloat16), as real models ship."""
    ckpt, text = tiny_ckpt
    d = tmp_path_factory.mktemp("bf16")
    m = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    m.save_pretrained(d)
    tf.AutoTokenizer.from_pretrained(ckpt).save_pretrained(d)
    return d, text


def test_dtype_auto_keeps_the_checkpoints_dtype(bf16_ckpt, tmp_path):
    """--dtype auto (the default) loads and quantizes a bf16 checkpoint in bf16: unquantized
    tensors stay bf16 in the native folder and in the serving export; --dtype fp32 widens."""
    ckpt, text = bf16_ckpt
    out = tmp_path / "q"
    lowbit_cli("quantize", ckpt, "--method", "gptq", "--scheme", "w4g32", "--static-groups",
               "--calib", text, *SMALL, "--calib-offset", "8", "--format", "native", "--out", out)
    assert json.loads((out / "lowbit.json").read_text())["dtype"] == "bf16"
    t = load_file(str(out / "lowbit.safetensors"))
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    e = json.loads(lowbit_cli("eval", out, "--data", text, "--windows", "2", "--seq-len", "64",
                              "--base", ckpt, "--json", "-", "--quiet").out)
    assert e["ppl"] > 0 and e["kl_mean"] >= 0
    lowbit_cli("export", out, tmp_path / "ct", "--format", "compressed-tensors", "--quiet")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    ct = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert ct["model.embed_tokens.weight"].dtype == torch.bfloat16
    wide = tmp_path / "q32"
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--dtype", "fp32",
               "--format", "native", "--out", wide, "--quiet")
    assert load_file(str(wide / "lowbit.safetensors"))["model.embed_tokens.weight"].dtype == \
        torch.float32


def test_eval_several_models_runs_the_base_once(tiny_ckpt, tmp_path, monkeypatch):
    ckpt, text = tiny_ckpt
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    for scheme in ("w4g32", "w8"):
        lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", scheme,
                   "--out", tmp_path / scheme, "--quiet")
    args = ["--data", text, "--windows", "3", "--seq-len", "32", "--base", ckpt, "--quiet"]
    r = lowbit_cli("eval", tmp_path / "w4g32", tmp_path / "w8", *args, "--json", "-",
                   "--batch", "2")
    rows = json.loads(r.out)
    assert [row["base_windows_run"] for row in rows] == [3, 0]
    assert rows[0]["kl_mean"] > rows[1]["kl_mean"] > 0  # 4-bit is further from the base
    table = [line for line in r.err.splitlines() if not line.startswith("building")]  # kernels
    assert table[0].split()[:4] == ["model", "ppl", "ppl/base", "KLD"] and len(table) == 5
    again = json.loads(lowbit_cli("eval", tmp_path / "w8", *args, "--json", "-").out)
    assert again["base_windows_run"] == 0
    assert again["kl_mean"] == pytest.approx(rows[1]["kl_mean"], rel=1e-4)  # batch 1 vs 2
    fresh = json.loads(lowbit_cli("eval", tmp_path / "w8", *args, "--no-base-cache",
                                  "--json", "-").out)
    assert fresh["base_windows_run"] == 3


def test_quantize_eval_records_the_figures_in_json_and_card(tiny_ckpt, tmp_path, monkeypatch):
    """--eval measures the result against the model as it was before quantizing; the figures
    equal `lowbit eval --base` on the same windows and reach lowbit.json and the model card."""
    ckpt, text = tiny_ckpt
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    r = lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--seq-len", "32",
                   "--eval", "3", "--eval-data", text, "--out", out, "--quiet")
    assert "eval on 3x32 tokens" in r.out
    rec = json.loads((out / "lowbit.json").read_text())["eval"]
    again = json.loads(lowbit_cli("eval", out, "--data", text, "--windows", "3", "--seq-len",
                                  "32", "--base", ckpt, "--json", "-", "--quiet").out)
    assert rec["ppl"] == pytest.approx(again["ppl"], rel=1e-6)
    assert rec["kl_mean"] == pytest.approx(again["kl_mean"], rel=1e-6)
    assert rec["top1"] == again["top1"]
    ct = tmp_path / "ct"
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--seq-len", "32",
               "--eval", "3", "--eval-data", text, "--format", "compressed-tensors",
               "--out", ct, "--quiet")
    card = (ct / "README.md").read_text()
    assert f"| perplexity | {rec['ppl']:.3f} |" in card
    bad = lowbit_cli("quantize", ckpt, "--method", "rtn", "--eval", "-1", "--out",
                     tmp_path / "x", ok=False)
    one_line_error(bad, "--eval takes")


def test_a_folder_without_tokenizer_is_a_one_line_error(tmp_path):
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    r = lowbit_cli("quantize", tmp_path / "m", "--method", "rtn", "--out", tmp_path / "q",
                   ok=False)
    one_line_error(r, "cannot load model from")
