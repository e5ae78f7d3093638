"""Tiny models of every family GGUF export writes, with a real byte-level BPE tokenizer and
SentencePiece-style ones, for the GGUF tests (not a test module)."""

from __future__ import annotations

import json

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


# SentencePiece-style tokenizers (Llama 2, Mistral, Gemma, Phi-3 as tokenizers.json): a BPE with
# byte fallback over text whose spaces are "▁"
SPM_TEXT = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, said the fox; the dog said nothing at all.",
    "  two spaces,   three spaces and a tab\tin one line",
    "numbers 0 1 2 3 4 5 6 7 8 9, 2024 and 12345",
    "un café naïve à la française, über alles",
] * 4
USER_TOKEN = "<|user|>"  # an added token that is not special


def tiny_spm_tokenizer(gemma: bool = False, metaspace: bool = False, pieces: int = 200):
    """A tokenizer laid out as transformers converts a SentencePiece BPE model: Llama 2's (the
    normalizer prepends "▁" and replaces spaces by "▁"; ids <unk> <s> </s>, then <0x00>..<0xFF>,
    then the pieces) or, ``gemma``, Gemma's (no prefix, a no-op Split(" ") pre-tokenizer; ids
    <pad> <eos> <bos> <unk>, bytes, pieces) or, ``metaspace``, transformers' own Llama tokenizer
    (a Metaspace pre-tokenizer, prepend_scheme "first"). The pieces are learnt by a BPE trainer,
    ordered as SentencePiece scores them (runs of spaces, merged pieces in the order learnt,
    then single characters), and every split of a piece becomes a merge ordered by the piece's
    score, as transformers' converter does. BOS is added, as by Llama 2 and Gemma."""
    from tokenizers import normalizers
    from transformers.tokenization_utils_base import generate_merges

    trainer = trainers.BpeTrainer(vocab_size=pieces, show_progress=False)
    learner = Tokenizer(models.BPE())  # pieces within words, as SentencePiece learns them
    learner.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="always", split=True)
    learner.train_from_iterator(SPM_TEXT, trainer)
    learnt = json.loads(learner.to_str())["model"]
    pairs = (m.split(" ") if isinstance(m, str) else m for m in learnt["merges"])
    merged = ["▁▁", "▁▁▁▁", *(a + b for a, b in pairs)]  # runs of spaces, as Llama 2 has
    singles = [t for t in learnt["vocab"] if len(t) == 1]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    vocab: dict[str, int] = {}
    for t in [*specials, *(f"<0x{b:02X}>" for b in range(256)), *merged, *singles]:
        vocab.setdefault(t, len(vocab))
    first_piece = len(specials) + 256
    scores = {t: -float(i) for t, i in vocab.items() if i >= first_piece}
    merges = generate_merges(vocab, scores)
    unk = specials[3] if gemma else specials[0]
    tk = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    )
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if metaspace:
        tk.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
    elif gemma:
        tk.normalizer = normalizers.Replace(" ", "▁")
        tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    else:
        tk.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
    if not gemma:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    bos, eos = ("<bos>", "<eos>") if gemma else ("<s>", "</s>")
    names = {"bos_token": bos, "eos_token": eos, "unk_token": "<unk>"}
    cls = tf.PreTrainedTokenizerFast if gemma else tf.LlamaTokenizerFast
    tok = cls(tokenizer_object=tk, add_bos_token=True, add_eos_token=False,
              pad_token="<pad>" if gemma else None, **names)  # fmt: skip
    # matched in the raw text (Llama 2's normalizer would prepend "▁" to a normalized one)
    tok.add_tokens([tf.AddedToken(USER_TOKEN, normalized=gemma, special=False)])
    tok.chat_template = CHAT_TEMPLATE
    return tok
