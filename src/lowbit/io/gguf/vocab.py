"""GGUF metadata other than the architecture's: the tokenizer, and what to carry over from a
source GGUF file.

A key/value is `(key, value, GGUFValueType, element type or None)`. Two kinds of transformers
tokenizer are built, both through the `gguf` package's vocab helpers (the ones llama.cpp's own
converter uses):

- byte-level BPE (Llama 3, Qwen2, SmolLM2; llama.cpp's "gpt2" model): tokens and token types
  from the vocabulary, the llama.cpp pre-tokenizer name recognised from the tokenizer's
  pre-tokenizer, merges from `gguf.SpecialVocab`;
- SentencePiece-style BPE, i.e. a BPE with byte fallback over "▁"-escaped text (Llama 2,
  Mistral, Gemma 1/2/3, Phi-3; llama.cpp's "llama" model, SentencePiece's algorithm): tokens
  and token types from `gguf.LlamaHfVocab`, scores from the merge ranks (see `_spm_scores`),
  and whether a "▁" is prepended to the text (`tokenizer.ggml.add_space_prefix`).

For both, `gguf.SpecialVocab` gives the special token ids and the chat template; whether BOS/EOS
are added is what the tokenizer does. Any other kind is refused.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

from gguf import GGUFValueType as V
from gguf import GGUFWriter, TokenType
from gguf.vocab import LlamaHfVocab, SpecialVocab

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


def _parts(spec: dict | None, seq_key: str) -> list[dict]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return list(spec.get(seq_key, []))
    return [spec]


def _split_pattern(p: dict) -> str | None:
    pat = p.get("pattern", {})
    return pat.get("Regex") or pat.get("String")


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizers pre-tokenizer spec."""
    parts = _parts(pre, "pretokenizers")
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


def _is_space_to_meta(p: dict) -> bool:
    return p.get("type") == "Replace" and _split_pattern(p) == " " and p.get("content") == "▁"


def spm_space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer prepends "▁" to the text (llama.cpp's
    `tokenizer.ggml.add_space_prefix`), from how it escapes spaces: a normalizer [Prepend("▁")]
    + Replace(" ", "▁") (Llama 2, Phi-3; Gemma without the Prepend, its Split(" ") pre-tokenizer
    then a no-op), or a non-splitting Metaspace pre-tokenizer (transformers' own Llama
    tokenizer, Mistral v0.3). Anything else is refused: llama.cpp would split text otherwise."""
    norms = _parts(spec.get("normalizer"), "normalizers")
    pres = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    kinds = [p.get("type") for p in norms] + [p.get("type") for p in pres]
    prepend = [p.get("type") == "Prepend" and p.get("prepend") == "▁" for p in norms]
    if norms and _is_space_to_meta(norms[-1]) and (len(norms) == 1 or prepend == [True, False]):
        noop_split = [
            p.get("type") == "Split" and _split_pattern(p) == " " and not p.get("invert")
            for p in pres
        ]
        if all(noop_split):  # the normalizer left no spaces to split at
            return len(norms) == 2
    if not norms and len(pres) == 1 and pres[0].get("type") == "Metaspace":
        meta = pres[0]
        if meta.get("replacement") == "▁" and not meta.get("split", True):
            return meta.get("prepend_scheme", "always") != "never"
    raise LowbitError(
        "the SentencePiece-style tokenizer escapes spaces in a way llama.cpp does not reproduce "
        f"({' + '.join(map(str, kinds)) or 'no normalizer or pre-tokenizer'}); export from the "
        "model's GGUF file instead"
    )


def tokenizer_kind(spec: dict) -> str:
    """llama.cpp's `tokenizer.ggml.model` for a tokenizers spec: "gpt2" (byte-level BPE) or
    "llama" (SentencePiece-style BPE with byte fallback); LowbitError for anything else."""
    model = spec.get("model", {})
    decoders = [d.get("type") for d in _parts(spec.get("decoder"), "decoders")]
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        pre_tokenizer_name(spec.get("pre_tokenizer"))  # refuses pre-tokenizers it does not know
        return "gpt2"
    if model.get("type") == "BPE" and "ByteFallback" in decoders:
        spm_space_prefix(spec)
        return "llama"
    what = str(model.get("type")) + (" with byte fallback" if model.get("byte_fallback") else "")
    raise LowbitError(
        f"GGUF export builds byte-level BPE and SentencePiece-style (BPE with byte fallback) "
        f"tokenizers, not {what}; export from the model's GGUF file instead"
    )


def _added(tok) -> dict[int, tuple[bool, bool]]:
    """id -> (special?, normalized?) for added tokens."""
    dec = getattr(tok, "added_tokens_decoder", None) or {}
    return {
        int(i): (bool(getattr(t, "special", False)), bool(getattr(t, "normalized", True)))
        for i, t in dec.items()
    }


def _adds(tok, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    with_sp = tok("a", add_special_tokens=True)["input_ids"]
    without = tok("a", add_special_tokens=False)["input_ids"]
    if len(with_sp) <= len(without):
        return False
    return (with_sp[0] if first else with_sp[-1]) == token_id


def _bpe_tokens(tok, vocab: dict[str, int]) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in vocab.items()}
    added = _added(tok)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(max(by_id, default=-1) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(int(TokenType.CONTROL if added[i][0] else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
    return tokens, types


def _spm_scores(spec: dict, vocab: dict[str, int], types: list[int]) -> list[float]:
    """llama.cpp's SentencePiece algorithm repeatedly merges the adjacent pair whose union is the
    token of highest score (ties: leftmost); BPE merges the pair of lowest merge rank. A token
    made by the merge of rank r scores -r, so that both merge in the same order (given the
    merges of every split of a token, as in tokenizers converted from SentencePiece, which
    order merges by the score of their union). Other normal tokens (single characters) score
    below every merge; special, byte and user-defined tokens 0, as in SentencePiece.
    `gguf.LlamaHfVocab` gives every token -1000, with which llama.cpp would merge leftmost
    first and split text unlike the tokenizer."""
    merges = spec["model"].get("merges", [])
    scores = [0.0] * len(types)
    made = set()
    for rank, m in enumerate(merges):
        a, b = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is not None and i not in made:
            scores[i] = -float(rank)
            made.add(i)
    for i, t in enumerate(types):
        if i not in made and t == TokenType.NORMAL:
            scores[i] = -float(len(merges) + i)
    return scores


def _spm_tokens(
    tok, spec: dict, vocab: dict[str, int], folder: Path
) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a SentencePiece-style tokenizer, through
    `gguf.LlamaHfVocab` (which reads the tokenizer saved in ``folder``)."""
    try:
        hf = LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError) as e:  # its own checks of the tokenizer's kind
        raise LowbitError(
            f"the gguf package does not read the tokenizer as SentencePiece-style: {e}"
        ) from None
    entries = list(hf.all_tokens())
    tokens = [text.decode("utf-8") for text, _, _ in entries]
    types = [int(t) for _, _, t in entries]
    if len(tokens) != len(vocab) or any(vocab.get(t) != i for i, t in enumerate(tokens)):
        raise LowbitError("the tokenizer's ids are not 0..n-1 in the order the gguf package reads")
    scores = _spm_scores(spec, vocab, types)
    # added tokens as the tokenizer marks them; a user-defined one matched after the normalizer
    # turned spaces into "▁" is matched by llama.cpp in the raw text, with spaces
    escapes_in_normalizer = spec.get("normalizer") is not None
    for i, (special, normalized) in _added(tok).items():
        if types[i] == TokenType.BYTE:
            continue
        types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        if not special and normalized and escapes_in_normalizer:
            tokens[i] = tokens[i].replace("▁", " ")
    if tok.unk_token_id is not None:
        types[tok.unk_token_id] = int(TokenType.UNKNOWN)  # as SentencePiece types it
    return tokens, scores, types


@contextmanager
def _quiet_gguf_vocab():
    """SpecialVocab warns about post-processor templates it half understands (Llama's pair
    template "<s> A <s> B"); what it decides there (add BOS/EOS) is replaced below."""
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def hf_tokenizer_kv(tok, n_vocab: int) -> list[KV]:
    """Tokenizer metadata for a byte-level BPE or SentencePiece-style transformers tokenizer;
    ``n_vocab`` is the model's embedding rows (ids the tokenizer lacks become unused "[PAD{id}]"
    tokens)."""
    spec = _backend_spec(tok)
    kind = tokenizer_kind(spec)
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= n_vocab:
        raise LowbitError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows"
        )
    w = GGUFWriter(None, "scratch")  # collects the helpers' keys; never written
    with tempfile.TemporaryDirectory(prefix="lowbit-tok-") as d, _quiet_gguf_vocab():
        tok.save_pretrained(d)
        if kind == "llama":
            tokens, scores, types = _spm_tokens(tok, spec, vocab, Path(d))
        else:
            tokens, types = _bpe_tokens(tok, vocab)
            scores = []
        special = SpecialVocab(d, load_merges=kind == "gpt2", n_vocab=n_vocab)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
        if scores:
            scores.append(min(scores) - 1.0)
    w.add_tokenizer_model(kind)
    if kind == "llama":
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(spm_space_prefix(spec))
    else:
        w.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
        w.add_token_list(tokens)
        w.add_token_types(types)
    # ids, merges and the chat template from SpecialVocab; whether BOS/EOS are added from what
    # the tokenizer does (SpecialVocab parses the post-processor's template, or the config)
    special.add_special_token["bos"] = _adds(tok, tok.bos_token_id, True)
    special.add_special_token["eos"] = _adds(tok, tok.eos_token_id, False)
    special.add_to_gguf(w, quiet=True)
    return [
        (key, v.value, v.type, v.sub_type or _element_type(v.value))
        for key, v in w.kv_data[0].items()
        if key != "general.architecture"
    ]


def _element_type(value) -> V | None:
    if not isinstance(value, list) or not value:
        return None
    return V.get_type(value[0])

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
