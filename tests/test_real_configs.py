"""Every family at its published shapes, through the command line a user types (CI's second
step: ``pytest -m slow``).

For each family lowbit quantizes, a random-weight model is built with transformers from the
published config of a real checkpoint (hidden size, heads, KV heads, head size, FFN width,
vocabulary, tying, RoPE and soft-capping settings, expert count and width) and saved in bf16
with a small byte-level BPE tokenizer (the GGUF vocabulary is padded to the model's rows; the
evaluation feeds random ids below 32000, within every vocabulary). Only the depth is cut,
to one block (gemma3: two, one sliding and one global; the code paths do not depend on
depth): the point is the real widths, which decide group and super-block divisibility,
head layouts and tensor sizes that tiny models never reach. Then:

1. ``lowbit quantize CKPT --method rtn --scheme w4g32`` writes its default output
   (compressed-tensors), which transformers loads: its logits equal lowbit's reload of the
   same folder;
2. ``lowbit export OUT F.gguf --type Q4_0``: the blocks' Linears are written from the folder's
   codes and scales (w4g32 is a Q4_0 grid: lowbit reading the file gets the folder's weights
   back exactly), the embeddings and head quantized by llama.cpp's type rules; llama.cpp loads
   the file, its perplexity is within 1.5% of lowbit's evaluation of the same file and its
   logits follow lowbit's (correlation; llama.cpp also rounds activations to 8 bits in its dot
   products).

Weights are drawn with standard deviation 2 / sqrt(hidden) (transformers' default 0.02 gives
near-uniform predictions, whose perplexity is the vocabulary size whatever the weights): logits
then spread over a few units, so a wrong tensor moves the perplexity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from cli_helpers import lowbit_cli
from gguf_helpers import tiny_tokenizer

pytestmark = pytest.mark.slow

_GEMMA3_1B = dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256, vocab_size=262144,
                  query_pre_attn_scalar=256, sliding_window=512, rope_theta=1_000_000.0,
                  rope_local_base_freq=10_000.0, tie_word_embeddings=True)

# published configs (the checkpoint named in the comment), depth cut (see the module docstring)
REAL = {
    "llama": ("llama", dict(  # meta-llama/Llama-3.2-1B
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, rope_theta=500_000.0, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(  # mistralai/Mistral-7B-v0.3
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, vocab_size=32768, rope_theta=1_000_000.0, sliding_window=None,
        tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(  # Qwen/Qwen2.5-1.5B
        hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(  # Qwen/Qwen3-0.6B
        hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, vocab_size=151936, rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "gemma": ("gemma", dict(  # google/gemma-2b
        hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
        head_dim=256, vocab_size=256000, tie_word_embeddings=True)),
    "gemma2": ("gemma2", dict(  # google/gemma-2-2b
        hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, vocab_size=256000, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True)),
    # the first two layers of the real pattern (five sliding, then one full): llama.cpp's
    # gemma3 has that pattern built in and lowbit's export refuses any other
    "gemma3_text": ("gemma3_text", _GEMMA3_1B | dict(  # google/gemma-3-1b-pt
        num_hidden_layers=2, layer_types=["sliding_attention", "sliding_attention"])),
    "phi3": ("phi3", dict(  # microsoft/Phi-3-mini-4k-instruct
        hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=32064, tie_word_embeddings=False, pad_token_id=32000)),
    "qwen2_moe": ("qwen2_moe", dict(  # Qwen/Qwen1.5-MoE-A2.7B
        hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
        tie_word_embeddings=False)),
    "qwen3_moe": ("qwen3_moe", dict(  # Qwen/Qwen3-30B-A3B
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        norm_topk_prob=True, vocab_size=151936, tie_word_embeddings=False)),
}
SEQ = 128
# Many-expert routing amplifies arithmetic differences: llama.cpp's CPU kernels round the
# activations of quantized products to Q8_0, and that alone (emulated in lowbit) changes the
# top-8 experts of 8 of 128 tokens of the qwen3_moe case (median gap between the 8th and 9th
# router logits 0.077, median router change 0.013). Each changed choice moves that token's
# logits, so the logit correlation with llama.cpp is 0.9988 there (0.9990 with the emulation)
# while perplexity agrees within the same 1.5%; the correlation bound is 0.998 for these.
ROUTED = {"qwen3_moe", "qwen2_moe"}
# Not here: Mixtral (one block of 8 experts of Mistral-7B's MLP is 1.7B parameters, 14 GB for
# the two fp32 models compared; its expert shapes are the mistral case's MLP and its code path
# the MoE cases'), OPT and GPT-2 (no GGUF export: refused in one line; GPT-2's Conv1D has no
# compressed-tensors form): their tiny models are tested in the default suite.


def _build(family: str, out) -> None:
    kind, kw = REAL[family]
    kw = {"num_hidden_layers": 1, "max_position_embeddings": 4096, "bos_token_id": 1,
          "eos_token_id": 2, "initializer_range": 2 / kw["hidden_size"] ** 0.5} | kw
    cfg = tf.AutoConfig.for_model(kind, **kw)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)  # fewer ids than any vocabulary: the export pads


def _take_file_weights(model, path) -> None:
    """Put the GGUF file's matrices into lowbit's ``model`` of the folder (read with the gguf
    package): the blocks' Linears must already be equal (carried over from the folder's codes
    and scales, bit for bit); the embeddings and output were quantized by the export and are
    copied in."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from lowbit.io.gguf.export import model_entries, unpermute_qk

    stored = {t.name: t for t in GGUFReader(path).tensors}
    checked = 0
    for e in model_entries(model):
        if e.module is None or e.experts or e.name not in stored:
            continue
        t = stored[e.name]
        w = dequantize(t.data, t.tensor_type).reshape(e.shape)
        if e.n_head:
            w = unpermute_qk(w, e.n_head)
        w = torch.from_numpy(np.ascontiguousarray(w)).float()
        if e.name.startswith("blk."):  # the folder's (QLinear) weight, dequantized
            torch.testing.assert_close(w, torch.from_numpy(e.get()).float(), rtol=0, atol=0)
            checked += 1
        else:
            with torch.no_grad():
                e.module.weight.copy_(w)
    assert checked


# written, not yet run to the end at these shapes (run, then drop the mark): none left
UNVERIFIED: set[str] = set()


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.skip(reason="not yet verified at real shapes"))
    if f in UNVERIFIED else f for f in REAL])
def test_real_shapes_round_trip(tmp_path, family):
    from lowbit.eval.llamacpp import llamacpp_perplexity, load_llama
    from lowbit.eval.metrics import evaluate
    from lowbit.models import load_model

    ckpt, out, gguf = tmp_path / "base", tmp_path / "q", tmp_path / "q.gguf"
    _build(family, ckpt)
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--out", out, "--quiet")
    assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
    ids = torch.randint(3, 32000, (2, SEQ), generator=torch.Generator().manual_seed(0))

    ours, _ = load_model(out)
    with torch.no_grad():
        ref = ours(input_ids=ids).logits.float()
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = hf(input_ids=ids).logits.float()
    del hf
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) < 1e-3 * scale, family

    lowbit_cli("export", out, gguf, "--type", "Q4_0", "--quiet")
    _take_file_weights(ours, gguf)  # lowbit's model of what the file holds
    with torch.no_grad():
        mine_logits = ours(input_ids=ids[:1]).logits[0].float().numpy()
    mine = evaluate(ours, ids, progress=False)["ppl"]
    del ours
    llm = load_llama(gguf, n_ctx=SEQ, n_threads=2)
    theirs = llamacpp_perplexity(gguf, ids, llm=llm)["ppl"]
    assert abs(theirs / mine - 1) < 0.015, (family, mine, theirs)
    llm.reset()
    llm.eval(ids[0].tolist())
    corr = np.corrcoef(np.asarray(llm.scores[:SEQ]).ravel(), mine_logits.ravel())[0, 1]
    assert corr > (0.998 if family in ROUTED else 0.999), (family, corr)
