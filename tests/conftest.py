"""Shared fixtures: tiny random models of every supported family (no download)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf
from hypothesis import settings

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_gemma3_config(**text) -> tf.Gemma3Config:
    """Multimodal Gemma 3 as Gemma 3 >= 4B ships (Gemma3ForConditionalGeneration): a tiny
    gemma3_text language model (``TINY``, heads of 16, overridden by ``text``), a tiny SigLIP
    vision tower (32x32 images of 2x2 patches, no pooling head, as in Gemma 3), 4 tokens per
    image; the image tokens are the last three ids of the vocabulary."""
    text_cfg = tf.Gemma3TextConfig(**(TINY | {"head_dim": 16} | text))
    vision = tf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=32, patch_size=16,
                                   vision_use_head=False)
    vocab = text_cfg.vocab_size
    return tf.Gemma3Config(text_config=text_cfg.to_dict(), vision_config=vision.to_dict(),
                           mm_tokens_per_image=4, boi_token_index=vocab - 3,
                           eoi_token_index=vocab - 2, image_token_index=vocab - 1)


FAMILIES = {
    "llama": lambda: tf.LlamaConfig(**TINY),
    "mistral": lambda: tf.MistralConfig(**TINY),
    "qwen2": lambda: tf.Qwen2Config(**TINY),
    "qwen3": lambda: tf.Qwen3Config(**TINY, head_dim=16),
    "gemma": lambda: tf.GemmaConfig(**TINY, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**TINY, head_dim=16),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**TINY, head_dim=16),
    "gemma3": tiny_gemma3_config,  # multimodal: the language model is quantized
    "phi3": lambda: tf.Phi3Config(**TINY, pad_token_id=0),
    "opt": lambda: tf.OPTConfig(
        vocab_size=256,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    ),
    "gpt2": lambda: tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256),
}

_MOE = dict(TINY, num_experts_per_tok=2)
# mixture-of-experts families: 4 experts, top-2 (every size a multiple of 32 and 64)
MOE_FAMILIES = {
    "mixtral": lambda: tf.MixtralConfig(**_MOE, num_local_experts=4),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**_MOE, num_experts=4, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=128),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_MOE, num_experts=4, moe_intermediate_size=64,
                                           head_dim=16),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = (FAMILIES | MOE_FAMILIES)[family]()
    cfg._attn_implementation = "eager" if family.startswith("gemma2") else "sdpa"
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


def save_tiny_llama(d, tok, intermediate_size: int = 128):
    """A random two-block Llama checkpoint with ``tok``'s vocabulary, saved to folder ``d``."""
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64,
                         intermediate_size=intermediate_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Llama checkpoint with the built-in model's tokenizer (byte-level BPE, so
    that GGUF export works), and a calibration/evaluation text file."""
    from lowbit.models import load_model

    _, tok = load_model("smollm2-135m")
    d = save_tiny_llama(tmp_path_factory.mktemp("tiny"), tok)
    text = d / "calib.txt"
    text.write_text("\n".join(
        f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(3000)))
    return d, text


@pytest.fixture
def windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (6, 32), generator=g)


# Property tests draw the same examples on every run, so a red CI run is reproducible and never a
# coin toss; `LOWBIT_HYPOTHESIS=explore pytest ...` searches fresh examples (run it by hand).
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("LOWBIT_HYPOTHESIS", "fixed"))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state, whatever ran (or was imported) before
    it: a test's random data must not depend on which other tests were collected."""
    torch.manual_seed(0)
