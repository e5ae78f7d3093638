"""``lowbit calc`` against the reference documents' worked figures (Llama-2-70B, 4k context,
fp16: 1.34 GB per sample, 86 GB at batch 64) and against bytes measured: a quantized model's
stored Linears and a quantized KV cache's stored tensors."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import lowbit_cli, one_line_error
from conftest import tiny_model

import lowbit
from lowbit.calc import calc
from lowbit.runtime.kvcache import QuantKVCache
from lowbit.runtime.qlinear import QuantModule

LLAMA2_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
              "max_position_embeddings": 4096, "tie_word_embeddings": False}


def test_the_documents_llama2_70b_figures(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(LLAMA2_70B))
    out = tmp_path / "calc.json"
    lowbit_cli("calc", f, "--kv", "fp16", "--context", "4096", "--batch", "64", "--json", out)
    r = json.loads(out.read_text())
    assert r["kv_bytes_per_sequence"] == 4096 * 2 * 80 * 8 * 128 * 2  # 1.34 GB
    assert round(r["kv_bytes_per_sequence"] / 1e9, 2) == 1.34
    assert round(r["kv_bytes"] / 1e9) == 86
    assert round(r["weight_bytes"] / 1e9) == 138  # 69.0 B parameters in fp16
    one_line_error(lowbit_cli("calc", f, "--kv", "int3", ok=False), "unknown KV-cache format")
    one_line_error(lowbit_cli("calc", f, "--context", "0", ok=False), "at least 1")


@pytest.mark.parametrize("scheme", ["w4g64", "w8", "nf4"])
def test_weight_bytes_equal_a_quantized_models_stored_linears(scheme):
    model = tiny_model("llama")
    r = calc(model.config, scheme, "fp16", 16)
    lowbit.quantize(model, {"steps": [{"step": "rtn", "scheme": scheme}]}, progress=False)
    stored = sum(m.storage_bytes() for m in model.modules() if isinstance(m, QuantModule))
    assert r["linear_bytes"] == stored


def test_kv_bytes_equal_a_quantized_caches_stored_tensors():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 80),
                        generator=torch.Generator().manual_seed(0))
    for name in ("kivi-k2v2-r16-g8", "int8"):
        cache = QuantKVCache(model, name)
        with torch.no_grad():
            model(input_ids=ids, cache=cache, use_cache=True)
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)  # flushes the prefill
        r = calc(model.config, None, name, cache.layers[0].get_seq_length())
        b = cache.nbytes()
        assert r["kv_bytes_per_token"] * cache.layers[0].stored == b["stored"]
        residual = cache.layers[0].keys.shape[-2]
        assert r["kv_bytes_per_sequence"] == b["stored"] + b["residual"] // 2  # fp32 -> fp16
        assert residual <= 23
