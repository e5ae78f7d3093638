"""Mixture-of-experts models as GGUF: stacked expert tensors (``ffn_*_exps``), routers kept in
F32, Qwen2-MoE's shared expert, the expert keys; llama.cpp (-m slow) computes the model's
logits, and its own quantizer writes the same bytes."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf_helpers import MOE_FAMILIES, TEXT, tiny_moe, tiny_tokenizer

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.gguf.export import export_gguf

FAMILIES = sorted(MOE_FAMILIES)
ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_tensors_types_and_keys(family, tmp_path):
    model, tok = tiny_moe(family), tiny_tokenizer()
    out = tmp_path / "m.gguf"
    export_gguf(model, tok, out, "Q4_K_M", progress=False)
    r = GGUFReader(out)
    arch = ARCH[family]
    assert _field(r, "general.architecture") == arch
    assert _field(r, f"{arch}.expert_count") == 4 and _field(r, f"{arch}.expert_used_count") == 2
    t = {x.name: x for x in r.tensors}
    for p in ("gate", "up", "down"):
        e = t[f"blk.1.ffn_{p}_exps.weight"]
        assert e.tensor_type.name in ("Q4_K", "Q6_K") and list(e.shape) == [256, 256, 4]
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert not any(n.startswith("blk.0.ffn_gate.") for n in t)  # no per-expert leftovers
    if family == "qwen2_moe":
        assert _field(r, f"{arch}.expert_shared_feed_forward_length") == 256
        assert t["blk.0.ffn_down_shexp.weight"].tensor_type.name in ("Q4_K", "Q6_K")
        v = t["blk.0.ffn_gate_inp_shexp.weight"]
        assert v.tensor_type.name == "F32" and list(v.shape) == [256]


def test_decoded_experts_are_written_back_per_expert(tmp_path):
    model, tok = tiny_moe("qwen3_moe"), tiny_tokenizer()
    before = model.model.layers[0].mlp.experts.down_proj[2].detach().clone()
    export_gguf(model, tok, tmp_path / "m.gguf", "Q4_0", progress=False,
                dequantize_into_model=True)
    after = model.model.layers[0].mlp.experts[2].down_proj.weight.detach()
    assert 0 < float((after - before).abs().max()) < 0.1 * float(before.abs().max())


def test_routing_llamacpp_does_not_compute_is_refused(tmp_path):
    model = tiny_moe("qwen3_moe")
    model.config.norm_topk_prob = False
    with pytest.raises(LowbitError, match="renormalise the top-k routing weights"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", "F32", progress=False)


def _llama_logits(path, ids):
    from lowbit.eval.llamacpp import load_llama

    llm = load_llama(path, n_ctx=64, n_threads=1)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])


def _ours(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_llamacpp_logits_match(family, tmp_path):
    """F32: llama.cpp's logits are transformers' (routing, shared expert and its gate)."""
    pytest.importorskip("llama_cpp")
    model, tok = tiny_moe(family), tiny_tokenizer()
    export_gguf(model, tok, tmp_path / "m.gguf", "F32", progress=False)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:48]
    ours = _ours(model, ids)
    np.testing.assert_allclose(_llama_logits(tmp_path / "m.gguf", ids), ours,
                               atol=2e-3 * np.abs(ours).max())


@pytest.mark.slow
def test_llama_quantize_writes_the_same_expert_bytes(tmp_path):
    pytest.importorskip("llama_cpp")
    from lowbit.eval.llamacpp import llamacpp_quantize

    model, tok = tiny_moe("qwen2_moe"), tiny_tokenizer()
    export_gguf(model, tok, tmp_path / "f32.gguf", "F32", progress=False)
    export_gguf(model, tok, tmp_path / "ours.gguf", "Q4_K_M", progress=False)
    llamacpp_quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", "Q4_K_M")
    a, b = ({t.name: (t.tensor_type.name, np.asarray(t.data).tobytes())
             for t in GGUFReader(p).tensors} for p in (tmp_path / "ours.gguf",
                                                       tmp_path / "theirs.gguf"))
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    assert a == b


@pytest.mark.slow
def test_gptq_quantized_moe_to_gguf(tmp_path):
    """A GPTQ-quantized MoE model exported as Q8_0: llama.cpp computes what lowbit's quantized
    model computes (up to Q8_0's re-encoding and llama.cpp's 8-bit activations), much closer
    than to the model before quantization."""
    pytest.importorskip("llama_cpp")
    model, tok = tiny_moe("qwen3_moe"), tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:48]
    base = _ours(model, ids)
    windows = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    lowbit.quantize(model, {"steps": [{"step": "gptq", "scheme": "w4g32"}]}, windows,
                    progress=False)
    # the quantized model holds QLinears (packed codes); Q8_0 re-encodes their decoded weights
    export_gguf(model, tok, tmp_path / "q.gguf", "Q8_0", progress=False)
    ours = _ours(model, ids)
    theirs = _llama_logits(tmp_path / "q.gguf", ids)
    err, shift = np.abs(theirs - ours).max(), np.abs(base - ours).max()
    print(f"llama.cpp vs lowbit {err:.4f}, quantization shift {shift:.4f}")
    assert err < 0.03 * np.abs(ours).max() and err < shift / 3


def test_cli_exports_a_quantized_moe_folder(tmp_path):
    """``lowbit export`` of a lowbit folder (per-expert QLinears) writes the stacked experts."""
    from cli_helpers import lowbit_cli

    model, tok = tiny_moe("mixtral"), tiny_tokenizer()
    res = lowbit.quantize(model, {"steps": [{"step": "rtn", "scheme": "w4g32"}]},
                          progress=False)
    lowbit.save(tmp_path / "q", model, tok, res)
    lowbit_cli("export", tmp_path / "q", tmp_path / "q.gguf", "--type", "Q4_K_M", "--quiet")
    t = {x.name: x for x in GGUFReader(tmp_path / "q.gguf").tensors}
    assert list(t["blk.1.ffn_down_exps.weight"].shape) == [256, 256, 4]
    assert t["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
