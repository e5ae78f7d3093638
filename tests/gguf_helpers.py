"""Tiny models of every family GGUF export writes, with a real byte-level BPE tokenizer, for
the GGUF tests (not a test module)."""

from __future__ import annotations

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
TEXT = "the quick brown fox jumps over the lazy dog. " * 20 + "hello world 12345, said the fox."


def tiny_tokenizer(vocab: int = 300):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([TEXT], trainer)
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(hidden: int = 256, tied: bool = False, seed: int = 0, vocab: int = 320):
    """2 blocks, 4 heads of 64 (2 kv heads); hidden 256 lets every K-quant fit."""
    return tiny_family("llama", hidden, seed, vocab, tie_word_embeddings=tied,
                       rope_theta=10000.0, pad_token_id=None)


# the families GGUF export writes, and the transformers config of each
GGUF_FAMILIES = {
    "llama": tf.LlamaConfig,
    "mistral": tf.MistralConfig,
    "qwen2": tf.Qwen2Config,
    "qwen3": tf.Qwen3Config,
    "gemma": tf.GemmaConfig,
    "gemma2": tf.Gemma2Config,
    "gemma3_text": tf.Gemma3TextConfig,
    "phi3": tf.Phi3Config,
}


def tiny_family(family: str, hidden: int = 256, seed: int = 0, vocab: int = 320, **extra):
    """A tiny model of ``family``: 4 heads of hidden/4 (2 kv heads), 2 blocks (gemma3_text: 6,
    so that its 6th block attends globally with the global RoPE base; ``gemma3`` is that
    language model in a multimodal Gemma 3 with a tiny vision tower), random weights and
    non-trivial norm weights (and biases), so that a misplaced or mis-scaled tensor shows.
    gemma2/3: query_pre_attn_scalar = head_dim, as llama.cpp scales queries; phi3: half the
    head dimensions rotated."""
    torch.manual_seed(seed)
    head_dim = hidden // 4
    kw: dict = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        head_dim=head_dim,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if family in ("gemma2", "gemma3_text", "gemma3"):
        kw["query_pre_attn_scalar"] = head_dim
    if family in ("gemma3_text", "gemma3"):
        kw["num_hidden_layers"] = 6
    if family == "phi3":
        kw["partial_rotary_factor"] = 0.5
        del kw["head_dim"]
    if family == "gemma3":  # multimodal (Gemma 3 >= 4B): GGUF holds its language model
        from conftest import tiny_gemma3_config

        cfg = tiny_gemma3_config(**(kw | extra))
    else:
        cfg = GGUF_FAMILIES[family](**(kw | extra))
    cfg._attn_implementation = "eager"  # gemma2's logit softcapping needs it
    model = tf.AutoModelForCausalLM.from_config(cfg)
    low = -0.5 if family.startswith("gemma") else 0.5  # Gemma norms scale by 1 + w
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(low, low + 1.0)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
            elif name.endswith("mm_input_projection_weight"):  # gemma3: zero-initialised
                p.normal_(0.0, 0.1)
    model.eval()
    return model


# mixture-of-experts families: 4 experts, top-2; the routing llama.cpp computes for each
MOE_FAMILIES = {
    "mixtral": lambda **kw: tf.MixtralConfig(**kw, num_local_experts=4),
    "qwen2_moe": lambda **kw: tf.Qwen2MoeConfig(**kw, num_experts=4, norm_topk_prob=False,
                                                moe_intermediate_size=kw["hidden_size"],
                                                shared_expert_intermediate_size=kw["hidden_size"]),
    "qwen3_moe": lambda **kw: tf.Qwen3MoeConfig(**kw, num_experts=4, norm_topk_prob=True,
                                                moe_intermediate_size=kw["hidden_size"]),
}


def tiny_moe(family: str, hidden: int = 256, seed: int = 0, vocab: int = 320):
    """A tiny MoE model (2 blocks, 4 experts, top-2; hidden 256 lets every K-quant fit) with
    non-trivial norm weights and biases."""
    torch.manual_seed(seed)
    cfg = MOE_FAMILIES[family](
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        head_dim=hidden // 4, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        num_experts_per_tok=2)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    return model.eval()
