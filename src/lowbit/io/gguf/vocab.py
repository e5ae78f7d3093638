"""GGUF metadata other than the architecture's: the tokenizer, and what to carry over from a
source GGUF file.

A key/value is `(key, value, GGUFValueType, element type or None)`. From a transformers
tokenizer only byte-level BPE ("gpt2" in llama.cpp) is built: tokens, token types, merges,
special token ids, whether BOS/EOS are added, the chat template, and the llama.cpp
pre-tokenizer name recognised from the tokenizer's pre-tokenizer.
"""

from __future__ import annotations

import json

from gguf import GGUFValueType as V
from gguf import TokenType

from lowbit.errors import LowbitError

KV = tuple[str, object, V, V | None]

# llama.cpp pre-tokenizer names for the split patterns of the byte-level BPE tokenizers we know
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# keys never copied from a source file: the writer sets them, or they describe the old file
_NOT_COPIED = (
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
    "quantize.",
)


def _pre_parts(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return list(pre.get("pretokenizers", []))
    return [pre]


def _split_pattern(p: dict) -> str | None:
    pat = p.get("pattern", {})
    return pat.get("Regex") or pat.get("String")


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizers pre-tokenizer spec."""
    parts = _pre_parts(pre)
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = _split_pattern(parts[0])
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
    raise LowbitError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) matches none "
        "that this exporter maps to llama.cpp (gpt-2, smollm, llama-bpe, qwen2); export from "
        "the model's GGUF file instead, whose tokenizer is carried over"
    )


def _backend_spec(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    return json.loads(backend.to_str())


def _added_flags(tok) -> dict[int, bool]:
    """id -> special? for added tokens."""
    dec = getattr(tok, "added_tokens_decoder", None) or {}
    return {int(i): bool(getattr(t, "special", False)) for i, t in dec.items()}


def _adds(tok, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    with_sp = tok("a", add_special_tokens=True)["input_ids"]
    without = tok("a", add_special_tokens=False)["input_ids"]
    if len(with_sp) <= len(without):
        return False
    return (with_sp[0] if first else with_sp[-1]) == token_id


def hf_tokenizer_kv(tok, n_vocab: int) -> list[KV]:
    """Tokenizer metadata for a byte-level BPE transformers tokenizer; ``n_vocab`` is the
    model's embedding rows (ids the tokenizer lacks become unused "[PAD{id}]" tokens)."""
    spec = _backend_spec(tok)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LowbitError(
            f"GGUF export builds only byte-level BPE tokenizers, not {model.get('type')}"
            + (" with byte fallback" if model.get("byte_fallback") else "")
            + "; export from the model's GGUF file instead"
        )
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= n_vocab:
        raise LowbitError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = _added_flags(tok)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            if i in added:
                types.append(int(TokenType.CONTROL if added[i] else TokenType.USER_DEFINED))
            else:
                types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kv: list[KV] = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", pre, V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
    ]
    ids = {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "unknown": tok.unk_token_id,
        "padding": tok.pad_token_id,
    }
    for name, i in ids.items():
        if i is not None:
            kv.append((f"tokenizer.ggml.{name}_token_id", int(i), V.UINT32, None))
    kv.append(("tokenizer.ggml.add_bos_token", _adds(tok, ids["bos"], True), V.BOOL, None))
    kv.append(("tokenizer.ggml.add_eos_token", _adds(tok, ids["eos"], False), V.BOOL, None))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        kv.append(("tokenizer.chat_template", template, V.STRING, None))
    return kv


def source_kv(reader, arch: str) -> list[KV]:
    """general.* and tokenizer.* keys of a source GGUF, to carry into the new file."""
    out: list[KV] = []
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", f"{arch}.")) or key.startswith(_NOT_COPIED):
            continue
        if not key.startswith(("general.", "tokenizer.")):
            continue
        types = list(field.types)
        if types[0] == V.ARRAY and (len(types) != 2 or types[1] == V.ARRAY):
            continue  # nested arrays: none of the keys llama.cpp reads for a llama model
        sub = types[1] if types[0] == V.ARRAY else None
        out.append((key, field.contents(), types[0], sub))
    return out
