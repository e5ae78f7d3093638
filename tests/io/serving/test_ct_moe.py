"""Mixture-of-experts models as compressed-tensors checkpoints: per-expert tensors named as in
the original transformers checkpoints (what vLLM and llm-compressor read), routers ignored,
loaded by transformers and by lowbit with the quantized model's logits."""

import json

import pytest
import torch
import transformers as tf
from cli_helpers import lowbit_cli
from conftest import MOE_FAMILIES, tiny_model
from safetensors import safe_open

import lowbit
from lowbit.io.serving import write_checkpoint
from lowbit.models import load_model

GPTQ = {"steps": [{"step": "gptq", "scheme": "w4g32", "static_groups": True}]}
SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape")


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_checkpoint_names_ignore_and_logits(family, windows, tmp_path):
    ref = tiny_model(family)
    ref.save_pretrained(tmp_path / "hf")  # transformers' own per-expert checkpoint names
    model = tiny_model(family)
    res = lowbit.quantize(model, GPTQ, windows, progress=False)
    q = logits(model, windows)
    out = tmp_path / "ct"
    write_checkpoint(out, "compressed-tensors", model, None, res.weights, {}, dtype="float32")

    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    w1 = "w1" if family == "mixtral" else "gate_proj"
    linears = (".experts.", ".shared_expert.", "_proj.weight")
    quantized = {k.removesuffix(".weight") for k in keys(tmp_path / "hf")
                 if k.endswith(".weight") and any(s in k for s in linears)}
    assert f"model.layers.1.{moe}.experts.3.{w1}" in quantized
    want = {k for k in keys(tmp_path / "hf") if k.rpartition(".")[0] not in quantized
            or k.endswith(".bias")}
    want |= {q + s for q in quantized for s in SUFFIXES}
    assert keys(out) == want

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    routers = [f"model.layers.{i}.{moe}.gate" for i in (0, 1)]
    if family == "qwen2_moe":
        routers += [f"model.layers.{i}.mlp.shared_expert_gate" for i in (0, 1)]
    assert sorted(qcfg["ignore"]) == sorted(["lm_head", *routers])

    back, _ = load_model(out)  # lowbit: per-expert QLinears
    assert torch.equal(logits(back, windows), q)
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # experts dequantized
    assert torch.allclose(logits(hf, windows), q, atol=2e-4 * float(q.abs().max()), rtol=0)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory, tiny_ckpt):
    """A tiny Mixtral checkpoint with the built-in tokenizer."""
    src, text = tiny_ckpt
    tok = tf.AutoTokenizer.from_pretrained(src)
    cfg = MOE_FAMILIES["mixtral"]()
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("mixtral")
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d, text


def test_cli_quantize_and_export_compressed_tensors(moe_ckpt, tmp_path):
    """``quantize --format compressed-tensors`` and ``export`` of a native folder write the same
    checkpoint names; transformers loads the export with lowbit's logits."""
    ckpt, text = moe_ckpt
    args = ["--method", "gptq", "--scheme", "w4g32", "--static-groups", "--calib", text,
            "--calib-samples", "4", "--seq-len", "64", "--quiet"]
    lowbit_cli("quantize", ckpt, *args, "--out", tmp_path / "ct", "--format",
               "compressed-tensors")
    lowbit_cli("quantize", ckpt, *args, "--out", tmp_path / "native")
    lowbit_cli("export", tmp_path / "native", tmp_path / "ct2", "--format", "compressed-tensors",
               "--quiet")
    assert keys(tmp_path / "ct") == keys(tmp_path / "ct2")
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight_packed" in keys(tmp_path / "ct")
    rows = [json.loads(r) for r in (tmp_path / "native" / "layers.jsonl").read_text().splitlines()]
    experts = [r for r in rows if "expert" in r]
    assert len(experts) == 2 * 4 * 3 and all({"tokens", "hessian"} <= set(r) for r in experts)
    x = torch.randint(0, 1000, (2, 16))
    mine, _ = load_model(tmp_path / "ct2")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ct2", dtype=torch.float32)
    a, b = logits(mine, x), logits(hf, x)
    assert torch.allclose(a, b, atol=2e-3 * float(a.abs().max()), rtol=0)
