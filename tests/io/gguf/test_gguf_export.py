"""GGUF export: metadata, tokenizer, tensor names/types/bytes, q/k permutation, presets,
every model family's tensors and keys, importance matrices, and the reader's handling of
corrupt files (no llama.cpp needed)."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, TokenType
from gguf.quants import dequantize as gguf_dequantize
from gguf_helpers import (
    CHAT_TEMPLATE,
    GGUF_FAMILIES,
    SPECIALS,
    USER_TOKEN,
    tiny_family,
    tiny_llama,
    tiny_spm_tokenizer,
    tiny_tokenizer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats import ggml
from lowbit.io.gguf.check import check_gguf, open_gguf, read_tensor
from lowbit.io.gguf.export import export_gguf, permute_qk, unpermute_qk
from lowbit.io.gguf.imatrix import Imatrix, collect_imatrix, load_imatrix, save_imatrix
from lowbit.io.gguf.presets import PRESETS, fallback, get_preset, tensor_types, use_more_bits


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(hidden=256, tied=False)


def _field(reader, key):
    return reader.fields[key].contents()


def _expected(model, name: str) -> np.ndarray:
    """The float32 weight the writer should encode for a GGUF tensor name (q/k permuted)."""
    cfg = model.config
    if name == "token_embd.weight":
        return model.model.embed_tokens.weight.detach().numpy()
    if name == "output.weight":
        return model.lm_head.weight.detach().numpy()
    if name == "output_norm.weight":
        return model.model.norm.weight.detach().numpy()
    _, i, kind, _ = name.split(".")
    layer = model.model.layers[int(i)]
    mod = {
        "attn_norm": layer.input_layernorm,
        "attn_q": layer.self_attn.q_proj,
        "attn_k": layer.self_attn.k_proj,
        "attn_v": layer.self_attn.v_proj,
        "attn_output": layer.self_attn.o_proj,
        "ffn_norm": layer.post_attention_layernorm,
        "ffn_gate": layer.mlp.gate_proj,
        "ffn_up": layer.mlp.up_proj,
        "ffn_down": layer.mlp.down_proj,
    }[kind]
    w = mod.weight.detach().numpy()
    if kind == "attn_q":
        w = permute_qk(w, cfg.num_attention_heads)
    if kind == "attn_k":
        w = permute_qk(w, cfg.num_key_value_heads)
    return w


# ----------------------------------------------------------------------------- presets


def test_unknown_type_lists_known_ones():
    with pytest.raises(LowbitError, match="known types: .*Q4_K_M"):
        get_preset("Q4_K_X")
    assert get_preset("q4_k_m").name == "Q4_K_M"


SMOL = {"token_embd.weight": (49152, 576), "output_norm.weight": (576,)}
for _i in range(30):
    SMOL |= {
        f"blk.{_i}.attn_norm.weight": (576,),
        f"blk.{_i}.attn_q.weight": (576, 576),
        f"blk.{_i}.attn_k.weight": (192, 576),
        f"blk.{_i}.attn_v.weight": (192, 576),
        f"blk.{_i}.attn_output.weight": (576, 576),
        f"blk.{_i}.ffn_norm.weight": (576,),
        f"blk.{_i}.ffn_gate.weight": (1536, 576),
        f"blk.{_i}.ffn_up.weight": (1536, 576),
        f"blk.{_i}.ffn_down.weight": (576, 1536),
    }


def test_preset_rules_on_the_default_models_shapes():
    t = tensor_types("Q4_K_M", SMOL, n_layer=30, n_gqa=3)
    assert t["token_embd.weight"] == "Q8_0"  # tied output: Q6_K, whose 256 block 576 lacks
    assert t["blk.0.attn_norm.weight"] == "F32"
    assert t["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K falls back for 576-wide rows
    assert t["blk.0.attn_v.weight"] == "Q8_0"  # use_more_bits -> Q6_K -> fallback
    assert t["blk.3.attn_v.weight"] == "Q5_0"
    assert t["blk.5.attn_v.weight"] == "Q8_0"
    assert t["blk.5.ffn_down.weight"] == "Q6_K"  # 1536-wide rows keep their K-quant
    assert t["blk.4.ffn_down.weight"] == "Q4_K"
    assert [use_more_bits(i, 30) for i in (0, 2, 3, 4, 5, 8, 25, 26, 29)] == [
        True, True, False, False, True, True, False, True, True,
    ]  # fmt: skip
    q2 = tensor_types("Q2_K", SMOL, n_layer=30, n_gqa=3)
    assert q2["blk.7.attn_v.weight"] == "Q4_0"  # Q3_K (n_gqa < 4) -> fallback
    assert q2["blk.7.ffn_down.weight"] == "Q3_K"
    assert q2["blk.7.attn_q.weight"] == "Q4_0"
    assert tensor_types("Q2_K", SMOL, n_layer=30, n_gqa=4)["blk.7.attn_v.weight"] == "Q5_0"
    q3 = tensor_types("Q3_K_M", SMOL, n_layer=30, n_gqa=3)
    assert (q3["blk.0.ffn_down.weight"], q3["blk.1.ffn_down.weight"]) == ("Q5_K", "Q4_K")
    assert (q3["blk.1.attn_v.weight"], q3["blk.2.attn_v.weight"]) == ("Q5_1", "Q5_0")
    ks = tensor_types("Q4_K_S", SMOL, n_layer=30, n_gqa=3)
    assert (ks["blk.3.attn_v.weight"], ks["blk.4.attn_v.weight"]) == ("Q5_1", "Q5_0")
    assert (ks["blk.2.ffn_down.weight"], ks["blk.3.ffn_down.weight"]) == ("Q5_K", "Q4_K")
    q4 = tensor_types("Q4_0", SMOL, n_layer=30, n_gqa=3)
    q4i = tensor_types("Q4_0", SMOL, n_layer=30, n_gqa=3, has_imatrix=True)
    assert (q4["blk.0.ffn_down.weight"], q4i["blk.0.ffn_down.weight"]) == ("Q4_0", "Q4_1")
    assert q4i["blk.3.ffn_down.weight"] == "Q4_0"
    assert tensor_types("Q8_0", SMOL, 30)["token_embd.weight"] == "Q8_0"
    assert set(tensor_types("F16", SMOL, 30).values()) == {"F16", "F32"}


def test_untied_output_and_fallbacks():
    shapes = {"token_embd.weight": (320, 256), "output.weight": (320, 256)}
    t = tensor_types("Q4_0", shapes, n_layer=1)
    assert t == {"token_embd.weight": "Q4_0", "output.weight": "Q6_K"}
    assert fallback("Q4_K", 576) == "Q5_0" and fallback("Q6_K", 576) == "Q8_0"
    assert fallback("Q5_K", 576) == "Q5_1" and fallback("IQ4_XS", 576) == "IQ4_NL"
    assert fallback("Q4_K", 48) == "F16" and fallback("Q4_0", 48) == "F16"
    assert fallback("Q4_K", 512) == "Q4_K"


# ----------------------------------------------------------------------------- q/k permutation


def _rope_hf(x, theta):  # rotate-half: pairs (j, j + d/2)
    d = x.shape[-1] // 2
    a, b = x[..., :d], x[..., d:]
    return np.concatenate(
        [a * np.cos(theta) - b * np.sin(theta), b * np.cos(theta) + a * np.sin(theta)], -1
    )  # noqa: E501


def _rope_ggml(x, theta):  # llama.cpp's normal RoPE: pairs (2j, 2j + 1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(theta) - b * np.sin(theta)
    out[..., 1::2] = a * np.sin(theta) + b * np.cos(theta)
    return out


def test_qk_permutation_matches_llama_cpp_rope():
    rng = np.random.default_rng(0)
    n_head, d, cols = 3, 8, 5
    w = rng.standard_normal((n_head * d, cols)).astype(np.float32)
    h = rng.standard_normal(cols).astype(np.float32)
    theta = rng.uniform(0, 3, d // 2)
    hf = _rope_hf((w @ h).reshape(n_head, d), theta).reshape(-1)
    gg = _rope_ggml((permute_qk(w, n_head) @ h).reshape(n_head, d), theta).reshape(-1)
    np.testing.assert_allclose(gg, permute_qk(hf, n_head), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    with pytest.raises(LowbitError):
        permute_qk(w[:5], n_head)


# ----------------------------------------------------------------------------- writer


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M", "Q5_1", "Q3_K_S", "F16"])
def test_export_reads_back(tmp_path, model, tok, qtype):
    out = tmp_path / f"m-{qtype}.gguf"
    res = export_gguf(model, tok, out, qtype, progress=False)
    r = open_gguf(out)
    cfg = model.config
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == PRESETS[qtype].ftype
    assert _field(r, "general.quantization_version") == 2
    assert _field(r, "llama.block_count") == 2
    assert _field(r, "llama.embedding_length") == 256
    assert _field(r, "llama.feed_forward_length") == 512
    assert _field(r, "llama.attention.head_count") == 4
    assert _field(r, "llama.attention.head_count_kv") == 2
    assert _field(r, "llama.rope.dimension_count") == 64
    assert _field(r, "llama.context_length") == 256
    assert _field(r, "llama.vocab_size") == 320
    assert _field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    names = {t.name for t in r.tensors}
    assert names == set(res["tensor_types"])
    assert len(names) == 3 + 2 * 9
    assert "output.weight" in names  # untied
    for t in r.tensors:
        want = res["tensor_types"][t.name]
        assert t.tensor_type.name == want, t.name
        w = _expected(model, t.name)
        assert tuple(reversed(t.shape.tolist())) == w.shape
        if want == "F32":
            np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w)
        elif want == "F16":
            np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w.astype(np.float16))
        else:  # the very bytes lowbit's quantizer makes, and gguf-py decodes them as we do
            data = np.asarray(t.data)
            np.testing.assert_array_equal(data, ggml.quantize(want, w))
            ours = ggml.dequantize(want, data, w.shape[1])
            np.testing.assert_array_equal(ours, gguf_dequantize(data, t.tensor_type))
            np.testing.assert_array_equal(read_tensor(r, t.name), ours)
    assert res["file_bytes"] == out.stat().st_size
    assert res["weights"] == sum(int(np.prod(_expected(model, n).shape)) for n in names)


def test_export_mix_and_bits(tmp_path, model, tok):
    res = export_gguf(model, tok, tmp_path / "a.gguf", "Q4_K_M", progress=False)
    t = res["tensor_types"]
    # 2 layers: use_more_bits is true for layer 1 only; the untied output gets Q6_K
    assert t["blk.0.attn_v.weight"] == "Q4_K" and t["blk.1.attn_v.weight"] == "Q6_K"
    assert t["blk.1.ffn_down.weight"] == "Q6_K" and t["output.weight"] == "Q6_K"
    assert t["token_embd.weight"] == "Q4_K"
    assert res["types"]["Q4_K"]["bpw"] == pytest.approx(4.5)
    assert res["types"]["Q6_K"]["bpw"] == pytest.approx(6.5625)
    assert 4.5 < res["bpw_linear"] < 6.5625


def test_tokenizer_metadata(tmp_path, model, tok):
    out = tmp_path / "t.gguf"
    export_gguf(model, tok, out, "Q8_0", progress=False)
    r = GGUFReader(out)
    tokens = _field(r, "tokenizer.ggml.tokens")
    vocab = tok.get_vocab()
    assert len(tokens) == 320
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-1] == "[PAD319]"  # the model has more rows than the tokenizer has tokens
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[:3] == [3, 3, 3] and types[10] == 1 and types[-1] == 5
    merges = _field(r, "tokenizer.ggml.merges")
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in spec] and merges
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(r, "tokenizer.ggml.bos_token_id") == SPECIALS.index("<|im_start|>")
    assert _field(r, "tokenizer.ggml.eos_token_id") == SPECIALS.index("<|im_end|>")
    assert _field(r, "tokenizer.ggml.unknown_token_id") == 0
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    assert _field(r, "tokenizer.chat_template") == CHAT_TEMPLATE


# SentencePiece-style tokenizers: (family, tiny_spm_tokenizer arguments, add_space_prefix)
SPM_CASES = {
    "llama2": ("llama", {}, True),
    "gemma": ("gemma", {"gemma": True}, False),
    "llama-metaspace": ("llama", {"metaspace": True}, True),
}


@pytest.mark.parametrize("case", list(SPM_CASES))
def test_sentencepiece_tokenizer_metadata(tmp_path, case):
    """A SentencePiece-style tokenizer (BPE with byte fallback over "▁"-escaped text) is written
    as llama.cpp's "llama" model: its tokens by id, byte tokens typed BYTE, specials CONTROL,
    <unk> UNKNOWN, the added token USER_DEFINED, the model's extra rows UNUSED; scores that order
    the merged pieces as the merges do, single characters below them; the special ids, BOS added
    and EOS not, whether a "▁" is prepended, and the chat template."""
    family, kw, prefix = SPM_CASES[case]
    tok = tiny_spm_tokenizer(**kw)
    out = tmp_path / f"{case}.gguf"
    export_gguf(tiny_family(family, hidden=64, vocab=512), tok, out, "Q8_0", progress=False)
    r = GGUFReader(out)
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.pre") == "default"
    assert "tokenizer.ggml.merges" not in r.fields
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    scores = _field(r, "tokenizer.ggml.scores")
    vocab = tok.get_vocab()
    n = len(vocab)
    assert len(tokens) == len(types) == len(scores) == 512
    assert tokens[:n] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 512)]
    first_byte = vocab["<0x00>"]
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}
    want_types = []
    for i, t in enumerate(tokens):
        if i >= n:
            want_types.append(TokenType.UNUSED)
        elif first_byte <= i < first_byte + 256:
            want_types.append(TokenType.BYTE)
        elif i == tok.unk_token_id:
            want_types.append(TokenType.UNKNOWN)
        elif i in specials:
            want_types.append(TokenType.CONTROL)
        elif t == USER_TOKEN:
            want_types.append(TokenType.USER_DEFINED)
        else:
            want_types.append(TokenType.NORMAL)
    assert types == [int(t) for t in want_types]
    # pieces were laid out as SentencePiece scores them: merged pieces, then single characters
    pieces = range(first_byte + 256, vocab[USER_TOKEN])
    singles = [i for i in pieces if len(tokens[i]) == 1]
    merged = [i for i in pieces if len(tokens[i]) > 1]
    assert singles and merged and max(merged) < min(singles)
    assert all(scores[a] > scores[b] for a, b in zip(merged, merged[1:], strict=False))
    assert max(scores[i] for i in singles) < min(scores[i] for i in merged)
    assert {scores[i] for i in range(first_byte + 256)} == {0.0}
    assert _field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(r, "tokenizer.ggml.unknown_token_id") == tok.unk_token_id
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    assert _field(r, "tokenizer.ggml.add_bos_token") is True
    assert _field(r, "tokenizer.ggml.add_eos_token") is False
    assert _field(r, "tokenizer.ggml.add_space_prefix") is prefix
    assert _field(r, "tokenizer.chat_template") == CHAT_TEMPLATE


def _with_backend(tok, **parts):
    """``tok`` with its tokenizers backend's parts replaced."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    for name, value in parts.items():
        setattr(backend, name, value)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")  # fmt: skip


def test_unknown_tokenizer_kinds_are_refused_in_one_line(tmp_path, model):
    from tokenizers import Tokenizer, models, pre_tokenizers

    spm = tiny_spm_tokenizer()
    unigram = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0))
    )
    cases = {
        "not Unigram": unigram,
        "escapes spaces in a way llama.cpp does not reproduce": _with_backend(
            spm, pre_tokenizer=pre_tokenizers.Metaspace("▁", split=True), normalizer=None
        ),
        "matches none": _with_backend(tok := tiny_tokenizer(),
                                      pre_tokenizer=pre_tokenizers.Whitespace()),  # fmt: skip
    }
    del tok
    for msg, bad in cases.items():
        with pytest.raises(LowbitError, match=msg) as e:
            export_gguf(model, bad, tmp_path / "x.gguf", "Q8_0", progress=False)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_source_gguf_metadata_is_carried_over(tmp_path, model, tok):
    src = tmp_path / "src.gguf"
    export_gguf(model, tok, src, "F32", progress=False)
    out = tmp_path / "out.gguf"
    export_gguf(model, None, out, "Q8_0", source_gguf=src, progress=False)
    a, b = GGUFReader(src), GGUFReader(out)
    for key in a.fields:
        if key.startswith("tokenizer.") or key == "general.name":
            assert b.fields[key].contents() == a.fields[key].contents(), key
    assert _field(b, "general.file_type") == PRESETS["Q8_0"].ftype


def test_dequantize_into_model(tmp_path, tok):
    m = tiny_llama(hidden=256)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m(ids).logits
    out = tmp_path / "d.gguf"
    export_gguf(m, tok, out, "Q4_0", progress=False, dequantize_into_model=True)
    r = GGUFReader(out)
    q = read_tensor(r, "blk.1.attn_q.weight")
    np.testing.assert_array_equal(
        m.model.layers[1].self_attn.q_proj.weight.detach().numpy(), unpermute_qk(q, 4)
    )
    np.testing.assert_array_equal(
        m.model.embed_tokens.weight.detach().numpy(), read_tensor(r, "token_embd.weight")
    )
    with torch.no_grad():
        after = m(ids).logits
    assert not torch.equal(before, after)
    assert torch.allclose(before, after, atol=0.5)


def test_tied_model_with_narrow_rows(tmp_path, tok):
    m = tiny_llama(hidden=64, tied=True)
    res = export_gguf(m, tok, tmp_path / "n.gguf", "Q4_K_M", progress=False)
    t = res["tensor_types"]
    assert "output.weight" not in t
    assert t["token_embd.weight"] == "Q8_0"  # tied: output rules, 64 % 256 -> Q8_0
    assert t["blk.0.attn_q.weight"] == "Q5_0"
    assert t["blk.0.ffn_down.weight"] == "Q5_0"  # 128-wide rows
    assert t["blk.1.ffn_down.weight"] == "Q8_0"


def test_bad_inputs(tmp_path, tok, model):
    from conftest import tiny_model

    with pytest.raises(LowbitError, match="does not support model type 'gpt2'"):
        export_gguf(tiny_model("gpt2"), tok, tmp_path / "x.gguf", "Q8_0", progress=False)
    with pytest.raises(LowbitError, match="known types"):
        export_gguf(model, tok, tmp_path / "x.gguf", "Q9_9", progress=False)
    with pytest.raises(LowbitError, match="needs an importance matrix"):
        export_gguf(model, tok, tmp_path / "x.gguf", "Q2_K_S", progress=False)
    bad = {"blk.0.attn_q.weight": np.ones(7, np.float32)}
    with pytest.raises(LowbitError, match="has 7 values"):
        export_gguf(model, tok, tmp_path / "x.gguf", "Q4_0", imatrix=bad, progress=False)
    with pytest.raises(LowbitError, match="not a llama GGUF"):
        src = tmp_path / "im.gguf"
        save_imatrix(Imatrix({"a.weight": np.ones(4, np.float32)}, {"a.weight": 1}, 1, 1), src)
        export_gguf(model, tok, tmp_path / "x.gguf", "Q8_0", source_gguf=src, progress=False)
    assert not list(tmp_path.glob(".x.gguf*")) and not (tmp_path / "x.gguf").exists()


# ----------------------------------------------------------------------------- every family

_LLAMA_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                "ffn_up", "ffn_down")  # fmt: skip
_GEMMA2_BLOCK = (*_LLAMA_BLOCK, "post_attention_norm", "post_ffw_norm")
# llama.cpp's tensors of one block (".weight" unless a suffix is given), and the model's own
# module each comes from
BLOCK_TENSORS = {
    "llama": _LLAMA_BLOCK,
    "mistral": _LLAMA_BLOCK,
    "qwen2": (*_LLAMA_BLOCK, "attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "qwen3": (*_LLAMA_BLOCK, "attn_q_norm", "attn_k_norm"),
    "gemma": _LLAMA_BLOCK,
    "gemma2": _GEMMA2_BLOCK,
    "gemma3_text": (*_GEMMA2_BLOCK, "attn_q_norm", "attn_k_norm"),
    "phi3": ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"),
}
HF_MODULE = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}  # fmt: skip
# architecture keys beyond the ones every family gets
EXTRA_KEYS = {
    "gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "attention.sliding_window": 4096},  # fmt: skip
    "gemma3_text": {"attention.sliding_window": 4096, "rope.freq_base_swa": 10000.0},
    "phi3": {"attention.sliding_window": 0, "rope.scaling.original_context_length": 4096},
}


def _hf_tensor(model, family: str, name: str) -> np.ndarray:
    """The transformers tensor behind a llama.cpp tensor name, as llama.cpp wants it (Gemma
    norms + 1, llama/mistral q/k rows permuted), worked out here independently of the writer."""
    m, cfg = model.model, model.config
    if name == "token_embd.weight":
        t = m.embed_tokens.weight
    elif name == "output.weight":
        t = model.lm_head.weight
    elif name == "output_norm.weight":
        t = m.norm.weight
    else:
        _, i, kind, param = name.split(".")
        layer = m.layers[int(i)]
        module = HF_MODULE.get(kind, "")
        if kind == "ffn_norm":  # gemma2/3 have a norm before and after each half-block
            gemma23 = family in ("gemma2", "gemma3_text")
            module = "pre_feedforward_layernorm" if gemma23 else "post_attention_layernorm"
        if (family, kind) == ("phi3", "ffn_up"):
            module = "mlp.gate_up_proj"  # gate rows, then up rows
        t = getattr(layer.get_submodule(module), param)
    w = t.detach().float().numpy().copy()
    if family.startswith("gemma") and name.endswith("norm.weight"):
        w = w + 1
    if family in ("llama", "mistral") and ".attn_q." in name:
        w = permute_qk(w, cfg.num_attention_heads)
    if family in ("llama", "mistral") and ".attn_k." in name:
        w = permute_qk(w, cfg.num_key_value_heads)
    return w


@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_every_family_exports_llama_cpp_names_and_keys(tmp_path, tok, family):
    """Each family's Q8_0 file holds llama.cpp's tensor names and architecture keys, norms as F32
    (Gemma's + 1), and each weight as the Q8_0 bytes of the (permuted) transformers weight."""
    model = tiny_family(family, hidden=64)
    out = tmp_path / f"{family}.gguf"
    res = export_gguf(model, tok, out, "Q8_0", progress=False)
    r = GGUFReader(out)
    arch = ARCH[family]
    cfg = model.config
    n_layer = cfg.num_hidden_layers
    tied = cfg.tie_word_embeddings
    want = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    for i in range(n_layer):
        want |= {f"blk.{i}.{n}" if "." in n else f"blk.{i}.{n}.weight"
                 for n in BLOCK_TENSORS[family]}  # fmt: skip
    assert {t.name for t in r.tensors} == want == set(res["tensor_types"])
    keys = {
        "block_count": n_layer, "context_length": 256, "embedding_length": 64,
        "feed_forward_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2,
        "attention.key_length": 16, "attention.value_length": 16, "vocab_size": 320,
        "rope.dimension_count": 8 if family == "phi3" else 16,
        "rope.freq_base": 1e6 if family == "gemma3_text" else 10000.0,
        "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
    } | EXTRA_KEYS.get(family, {})  # fmt: skip
    assert _field(r, "general.architecture") == arch
    assert {k: _field(r, f"{arch}.{k}") for k in keys} == pytest.approx(keys)
    assert not [k for k in r.fields if k.startswith(f"{arch}.") and k[len(arch) + 1 :] not in keys]
    for t in r.tensors:
        w = _hf_tensor(model, family, t.name)
        assert tuple(reversed(t.shape.tolist())) == w.shape, t.name
        data = np.asarray(t.data)
        if w.ndim == 1:
            assert t.tensor_type.name == "F32", t.name
            np.testing.assert_array_equal(data.reshape(w.shape), w, err_msg=t.name)
        else:
            assert t.tensor_type.name == "Q8_0", t.name
            np.testing.assert_array_equal(data, ggml.quantize("Q8_0", w), err_msg=t.name)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "phi3"])
def test_every_family_imatrix_names_are_the_exported_ones(tmp_path, tok, family):
    """The importance matrix is keyed by the names of the exported weight matrices (phi3:
    `attn_qkv`, `ffn_up` = gate and up), so export finds an entry for every one."""
    model = tiny_family(family, hidden=64)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    im = collect_imatrix(model, ids, progress=False)
    res = export_gguf(model, tok, tmp_path / "i.gguf", "Q4_K_M", imatrix=im, progress=False)
    matrices = {n for n in res["tensor_types"] if n.startswith("blk.") and "norm" not in n
                and n.endswith(".weight")}  # fmt: skip
    assert set(im.data) == matrices and not res["imatrix_missing"]
    if family == "phi3":
        assert im.data["blk.0.attn_qkv.weight"].shape == (64,)


def test_multimodal_gemma3_is_written_as_its_language_model(tmp_path, tok):
    """Gemma 3 >= 4B (Gemma3ForConditionalGeneration) is written as llama.cpp's gemma3: the
    file of its language model on its own (gemma3_text), key for key and byte for byte; the
    vision tower and projector are left out (llama.cpp reads them from a separate mmproj
    file). Its importance matrix has the text model's entries."""
    mm = tiny_family("gemma3", hidden=64)
    text = tiny_family("gemma3_text", hidden=64)
    text.model.load_state_dict(mm.model.language_model.state_dict())
    readers = []
    for name, m in (("mm", mm), ("text", text)):
        export_gguf(m, tok, tmp_path / f"{name}.gguf", "Q8_0", progress=False)
        readers.append(GGUFReader(tmp_path / f"{name}.gguf"))
    a, b = readers
    assert _field(a, "general.architecture") == "gemma3"
    assert {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")} == {
        k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert x.tensor_type == y.tensor_type
        assert np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes(), x.name
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    im_mm, im_text = (collect_imatrix(m, ids, progress=False) for m in (mm, text))
    assert im_mm.data.keys() == im_text.data.keys()
    for k, v in im_mm.data.items():
        np.testing.assert_allclose(v, im_text.data[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("family,extra,msg", [
    ("gemma2", {"query_pre_attn_scalar": 32}, r"scales queries by 1/sqrt\(16\).*scalar 32"),
    ("gemma3_text", {"query_pre_attn_scalar": 256}, r"1/sqrt\(16\).*scalar 256"),
    ("gemma2", {"attn_logit_softcapping": None}, "always applies attn_logit_softcapping"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "does not apply attn_logit_softcapping"),
    ("gemma3_text", {"layer_types": ["full_attention"] * 6}, "layers SSSSSF; .* has FFFFFF"),
    ("gemma2", {"layer_types": ["sliding_attention"] * 2}, "layers SF; .* has SS"),
    ("gemma", {"tie_word_embeddings": False}, "lm_head.weight has no tensor in llama.cpp's gemma"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
     "RoPE scaling of type 'yarn'"),
])  # fmt: skip
def test_export_refuses_what_llama_cpp_computes_differently(tmp_path, tok, family, extra, msg):
    model = tiny_family(family, hidden=64, **extra)
    with pytest.raises(LowbitError, match=msg) as e:
        export_gguf(model, tok, tmp_path / "x.gguf", "F32", progress=False)
    assert "\n" not in str(e.value)


def test_refused_families_say_so_in_one_line(tmp_path, tok):
    from conftest import tiny_model

    for family in ("opt", "gpt2"):
        with pytest.raises(LowbitError, match=f"does not support model type '{family}'.*phi3"):
            export_gguf(tiny_model(family), tok, tmp_path / "x.gguf", "F32", progress=False)
        with pytest.raises(LowbitError, match="does not support model type"):
            collect_imatrix(tiny_model(family), torch.zeros(1, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- imatrix


@pytest.fixture(scope="module")
def imatrix(model):
    ids = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(2))
    return collect_imatrix(model, ids, progress=False, dataset="random ids"), ids


def test_imatrix_is_mean_square_input(model, imatrix):
    im, ids = imatrix
    assert set(im.data) == {f"blk.{i}.{n}.weight" for i in range(2) for n in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}  # fmt: skip
    seen = {}
    mods = {
        "attn_k": model.model.layers[1].self_attn.k_proj,
        "ffn_down": model.model.layers[1].mlp.down_proj,
    }  # noqa: E501
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, k=k: seen.setdefault(k, a[0]))
        for k, m in mods.items()
    ]  # noqa: E501
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for k, x in seen.items():
        ref = (x.reshape(-1, x.shape[-1]).double() ** 2).mean(0).numpy()
        np.testing.assert_allclose(im.data[f"blk.1.{k}.weight"], ref, rtol=1e-4, atol=1e-7)
    assert im.counts["blk.0.attn_q.weight"] == ids.numel()
    assert (im.chunks, im.chunk_size) == (3, 24)


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_imatrix_file_round_trip(tmp_path, imatrix, suffix):
    im, _ = imatrix
    path = tmp_path / f"im{suffix}"
    save_imatrix(im, path)
    back = load_imatrix(path)
    assert set(back.data) == set(im.data)
    for k, v in im.data.items():
        np.testing.assert_allclose(back.data[k], v, rtol=1e-6)
    assert back.chunks == 3 and back.datasets == ["random ids"]


def test_imatrix_file_layouts(tmp_path):
    name = "blk.0.attn_q.weight"
    data = {name: np.array([1.0, 2.0], np.float32)}
    im = Imatrix(data, {name: 100}, chunks=2, chunk_size=50, datasets=["d.txt"])
    save_imatrix(im, tmp_path / "a.dat")
    raw = (tmp_path / "a.dat").read_bytes()
    name = name.encode()
    want = struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 2, 2)
    want += np.array([2.0, 4.0], "<f4").tobytes() + struct.pack("<ii", 2, 5) + b"d.txt"
    assert raw == want  # llama-imatrix's legacy layout: mean * ncall, ncall = tokens / chunk
    save_imatrix(im, tmp_path / "a.gguf")
    r = GGUFReader(tmp_path / "a.gguf")
    assert _field(r, "general.type") == "imatrix"
    assert _field(r, "imatrix.datasets") == ["d.txt"]
    assert (_field(r, "imatrix.chunk_count"), _field(r, "imatrix.chunk_size")) == (2, 50)
    t = {x.name: x for x in r.tensors}
    np.testing.assert_array_equal(t[f"{name.decode()}.in_sum2"].data.reshape(-1), [100.0, 200.0])
    np.testing.assert_array_equal(t[f"{name.decode()}.counts"].data.reshape(-1), [100.0])
    assert tuple(t[f"{name.decode()}.in_sum2"].shape) == (2, 1)  # ne0 = columns, ne1 = matrices


def test_export_with_imatrix_uses_it(tmp_path, model, tok, imatrix):
    im, _ = imatrix
    out = tmp_path / "i.gguf"
    res = export_gguf(model, tok, out, "Q4_K_M", imatrix=im, progress=False)
    assert res["imatrix"] and not res["imatrix_missing"]
    t = {x.name: x for x in GGUFReader(out).tensors}
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.ffn_up.weight"):
        kind = res["tensor_types"][name]
        w = _expected(model, name)
        data = np.asarray(t[name].data)
        np.testing.assert_array_equal(data, ggml.quantize(kind, w, im.data[name]))
        assert not np.array_equal(data, ggml.quantize(kind, w))


def test_imatrix_loader_rejects_garbage(tmp_path):
    p = tmp_path / "x.dat"
    for raw in (b"", b"\x05\x00\x00\x00abc", struct.pack("<ii", 1, 1000) + b"ab"):
        p.write_bytes(raw)
        with pytest.raises(LowbitError, match="not an imatrix file"):
            load_imatrix(p)
    with pytest.raises(LowbitError, match="cannot read"):
        load_imatrix(tmp_path / "missing.dat")


# ----------------------------------------------------------------------------- corrupt files


def _small_gguf(path) -> bytes:
    w = GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("general.name", "fuzz")
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "<s>"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    w.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    q = ggml.quantize("Q8_0", np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    p = tmp_path_factory.mktemp("fuzz") / "ok.gguf"
    return _small_gguf(p)


def _read_all(path) -> None:
    r = open_gguf(path)
    for t in r.tensors:
        read_tensor(r, t.name)
    for f in r.fields.values():
        f.contents()


def _data_end(info: dict) -> int:
    return info["data_offset"] + max(t["offset"] + t["nbytes"] for t in info["tensors"].values())


def test_reader_accepts_valid_and_rejects_obvious_garbage(tmp_path, small_gguf):
    p = tmp_path / "f.gguf"
    p.write_bytes(small_gguf)
    info = check_gguf(p)
    assert set(info["tensors"]) == {"a.weight", "b.weight"}
    _read_all(p)
    for raw, msg in [
        (b"", "empty file"),
        (b"GGML" + small_gguf[4:], "bad magic"),
        (small_gguf[:4] + struct.pack("<I", 7) + small_gguf[8:], "version 7"),
        (small_gguf[:100], "truncated"),
        (small_gguf[: _data_end(info) - 5], "truncated: data of tensor"),
        (small_gguf[:8] + struct.pack("<Q", 2**60) + small_gguf[16:], "claims"),
    ]:
        p.write_bytes(raw)
        with pytest.raises(LowbitError, match=msg):
            open_gguf(p)
    with pytest.raises(LowbitError, match="cannot read"):
        check_gguf(tmp_path / "none.gguf")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)  # noqa: E501
@given(data=st.data())
def test_fuzz_reader_truncated_or_corrupted(tmp_path, small_gguf, data):
    raw = bytearray(small_gguf)
    mode = data.draw(st.sampled_from(["truncate", "bytes", "u64"]))
    if mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif mode == "bytes":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    else:  # a huge or odd length/count/dimension/offset somewhere in the header
        pos = data.draw(st.integers(0, 400))
        val = data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]))
        raw[pos : pos + 8] = struct.pack("<Q", val)
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(raw))
    t0 = time.perf_counter()
    try:
        _read_all(p)
    except LowbitError:
        pass
    assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------- command line


def test_cli_imatrix_then_export(tmp_path, model, tok):
    from click.testing import CliRunner
    from gguf_helpers import TEXT

    from lowbit.cli import cli

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (tmp_path / "calib.txt").write_text(TEXT * 4)
    im_path, out = tmp_path / "im.dat", tmp_path / "o.gguf"

    def run(cmd, args):
        return CliRunner().invoke(cli, [cmd, *args])

    r = run("imatrix", [str(folder), "--out", str(im_path), "--calib",
                        str(tmp_path / "calib.txt"), "--calib-samples", "2", "--seq-len", "16",
                        "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "14 entries (dat)" in r.output and len(load_imatrix(im_path).data) == 14
    again = [str(folder), "--out", str(im_path), "--calib", str(tmp_path / "calib.txt"),
             "--calib-samples", "3", "--seq-len", "16", "--quiet"]
    r = run("imatrix", again)
    assert r.exit_code != 0 and "exists; pass --overwrite" in str(r.exception)
    assert run("imatrix", [*again, "--overwrite"]).exit_code == 0  # an imatrix: replaced
    assert load_imatrix(im_path).chunks == 3
    r = run(
        "export", [str(folder), str(out), "--type", "q4_k_m", "--imatrix", str(im_path), "--quiet"]
    )  # noqa: E501
    assert r.exit_code == 0, r.output
    assert "Q4_K_M with imatrix" in r.output
    assert _field(GGUFReader(out), "general.file_type") == PRESETS["Q4_K_M"].ftype
    for args, msg in [
        ([str(folder), str(out)], "exists; pass --overwrite"),
        ([str(folder), str(tmp_path / "p.gguf"), "--type", "Q7"], "known types: F32"),
        ([str(folder), str(tmp_path / "p.gguf"), "--format", "exl2"], "known: gguf"),
        ([str(tmp_path / "none"), str(tmp_path / "p.gguf")], "model not found"),
    ]:
        r = run("export", args)
        assert isinstance(r.exception, LowbitError) and msg in str(r.exception), r.exception


def test_export_from_a_lowbit_gptq_folder(tmp_path, tok):
    """A lowbit output folder (QLinear modules) exports its dequantized weights."""
    import lowbit
    from lowbit.io.native import load_quantized, save_quantized
    from lowbit.runtime.qlinear import QLinear

    m = tiny_llama(hidden=256)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    res = lowbit.quantize(m, lowbit.shorthand("gptq", "w4g64"), ids, progress=False)
    folder = save_quantized(tmp_path / "q", m, tok, res.weights, {"method": "gptq"})
    back, back_tok = load_quantized(folder)
    mod = back.model.layers[1].self_attn.k_proj
    assert isinstance(mod, QLinear)
    out = tmp_path / "q.gguf"
    export_gguf(back, back_tok, out, "F32", progress=False)
    got = read_tensor(open_gguf(out), "blk.1.attn_k.weight")
    want = permute_qk(mod.dequantized_weight().detach().numpy(), 2)
    np.testing.assert_array_equal(got, want)
    # the quantized weights, not the original ones
    assert not np.array_equal(got, permute_qk(tiny_llama(hidden=256).model.layers[1]
                                              .self_attn.k_proj.weight.detach().numpy(), 2))


@pytest.mark.parametrize("method,scheme,kind", [
    ("w8a8", "w8a8", "W8A8Linear"),
    ("llm-int8", None, "Int8MixedLinear"),
    ("w8a8", "w8a8-fp8", "FP8Linear"),
])
def test_export_from_a_lowbit_int8_or_fp8_folder(tmp_path, tok, method, scheme, kind):
    """W8A8, LLM.int8() and FP8 folders (runtime modules without a ``weight``) export their
    dequantized weights too (issue 13: they used to fail with an AttributeError)."""
    import lowbit
    from lowbit.io.native import load_quantized, save_quantized

    m = tiny_llama(hidden=256)
    res = lowbit.quantize(m, lowbit.shorthand(method, scheme), None, progress=False)
    folder = save_quantized(tmp_path / "q", m, tok, res.weights, {"method": method})
    back, back_tok = load_quantized(folder)
    mods = {n: back.get_submodule(n) for n in res.weights}
    assert {type(mod).__name__ for mod in mods.values()} == {kind}
    assert not any(hasattr(mod, "weight") for mod in mods.values())
    out = tmp_path / "q.gguf"
    export_gguf(back, back_tok, out, "F32", progress=False)
    r = open_gguf(out)
    for name, gname, heads in (("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight", 2),
                               ("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight", 0)):
        want = mods[name].dequantized_weight().detach().numpy()
        want = permute_qk(want, heads) if heads else want
        np.testing.assert_array_equal(read_tensor(r, gname), want)
