"""The real client: llama.cpp (through llama-cpp-python) loads lowbit's GGUF files and agrees
with lowbit's own evaluation of the same dequantized weights, and with transformers' logits
for a tiny model of every family GGUF export writes. CI's second step (-m slow).

Conditions of the per-family logit check (`test_tiny_hf_logits_match`): sequences stay below
every sliding window (llama.cpp attends to the whole context of mistral, qwen2 and phi3,
where transformers would slide); gemma2/gemma3 models have query_pre_attn_scalar = head_dim
(llama.cpp scales queries by 1/sqrt(head_dim) except for the 27B models); gemma3 has 6
blocks so that one attends globally with the global RoPE base; the byte-level BPE
tokenizer of `gguf_helpers` serves every family."""

from __future__ import annotations

import ctypes
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf_helpers import (
    GGUF_FAMILIES,
    TEXT,
    tiny_family,
    tiny_llama,
    tiny_spm_tokenizer,
    tiny_tokenizer,
)

pytestmark = pytest.mark.slow
pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)",
)

from lowbit import data  # noqa: E402
from lowbit.eval.llamacpp import (  # noqa: E402
    llamacpp_generate,
    llamacpp_perplexity,
    llamacpp_quantize,
    load_llama,
)
from lowbit.eval.metrics import evaluate  # noqa: E402
from lowbit.io.gguf.export import export_gguf  # noqa: E402
from lowbit.io.gguf.imatrix import collect_imatrix  # noqa: E402
from lowbit.models import builtin_path, load_model  # noqa: E402

WIKI = Path(__file__).resolve().parents[4] / "shared/data/wikitext-2-raw/wiki.test.raw"
N_WINDOWS = 3
PROMPT = "The history of the city begins in the Middle Ages, when"


@pytest.fixture(scope="module")
def real():
    model, tok = load_model("smollm2-135m")
    ids = data.tokenize(tok, data.read_text(WIKI))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, tok, ids, state


def _tensor_bytes(path) -> dict[str, tuple[str, bytes]]:
    return {
        t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors
    }  # noqa: E501


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K_M", "Q2_K"])
def test_llamacpp_perplexity_matches_lowbit(tmp_path, real, qtype):
    """Protocol windows: llama.cpp's perplexity of the file is within 1.5% of lowbit's on the
    very weights the file holds (written back into the model). Not closer: llama.cpp also
    rounds the activations (to Q8_K / Q8_0 blocks for its quantized dot products) and keeps
    the KV cache in f16; on Q4_K_M that alone costs 1.03% here (30.65 -> 30.97)."""
    model, tok, ids, state = real
    windows = data.windows(ids, N_WINDOWS, 512)
    out = tmp_path / f"{qtype}.gguf"
    try:
        export_gguf(model, tok, out, qtype, source_gguf=builtin_path("smollm2-135m"),
                    progress=False, dequantize_into_model=True)  # fmt: skip
        ours = evaluate(model, windows, progress=False)["ppl"]
    finally:
        model.load_state_dict(state)
    theirs = llamacpp_perplexity(out, windows, n_threads=1)["ppl"]
    assert abs(theirs / ours - 1) < 0.015, (qtype, ours, theirs)


def test_llamacpp_generates_text(tmp_path, real):
    """Greedy decoding of 32 tokens gives text the base model itself finds likely."""
    model, tok, _, _ = real
    out = tmp_path / "g.gguf"
    export_gguf(model, tok, out, "Q4_K_M", source_gguf=builtin_path("smollm2-135m"),
                progress=False)  # fmt: skip
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    gen = llamacpp_generate(out, prompt, 32)
    text = tok.decode(gen)
    assert len(gen) == 32 and len(text.split()) >= 10, text
    printable = sum(c in string.printable for c in text) / len(text)
    assert printable > 0.95, text
    with torch.no_grad():  # perplexity of the continuation under the fp32 base model
        ids = torch.tensor([prompt + gen])
        lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        ppl = float(torch.exp(-lp.gather(-1, torch.tensor(gen)[:, None]).mean()))
    assert ppl < 10, (ppl, text)


def test_tokenizer_built_from_transformers_loads_in_llamacpp(tmp_path, real):
    """Without the source GGUF the tokenizer comes from transformers; llama.cpp must split
    text into the same ids."""
    model, tok, _, _ = real
    out = tmp_path / "hf.gguf"
    export_gguf(model, tok, out, "Q8_0", progress=False)
    llm = load_llama(out, n_ctx=64)
    text = data.read_text(WIKI)[:3000]
    assert (
        llm.tokenize(text.encode(), add_bos=False, special=False)
        == data.tokenize(tok, text).tolist()
    )


@pytest.mark.parametrize("family", [*GGUF_FAMILIES, "gemma3"])
def test_tiny_hf_logits_match(tmp_path, family):
    """A transformers model of each family (norms, Gemma's 1 + w norms, q/k permutation or
    NEOX RoPE, partial rotary, biases, q/k norms, logit caps, gemma3's global layer and its
    two RoPE bases, phi3's fused matrices, tied or untied output; multimodal gemma3: its
    language model, text only) exported as F32 gives llama.cpp logits equal to transformers'
    own. 48 tokens: below every sliding window."""
    model, tok = tiny_family(family), tiny_tokenizer()
    out = tmp_path / f"{family}.gguf"
    export_gguf(model, tok, out, "F32", progress=False)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:48]
    llm = load_llama(out, n_ctx=64, n_threads=1)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False)[:48] == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-3 * np.abs(ours).max())


def test_llamacpp_computes_with_lowbits_own_grid(tmp_path):
    """A w4g32 model exported as Q4_0 (lowbit's codes and scales as they are): llama.cpp's
    logits are those of lowbit's weights, not of the weights re-encoding would give. The float
    twin holds lowbit's dequantized weights; its Q4_0 export (re-encoded, written back into it)
    gives the embedding and output as the file has them, and the re-encoded block weights."""
    import lowbit
    from lowbit.runtime.qlinear import QLinear

    tok = tiny_tokenizer()
    model, twin = tiny_llama(hidden=256), tiny_llama(hidden=256)
    lowbit.quantize(model, lowbit.shorthand("rtn", "w4g32"), None, progress=False)

    def lowbit_weights():
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, QLinear):
                    twin.get_submodule(name).weight.copy_(mod.dequantized_weight())

    def logits(m):
        with torch.no_grad():
            return m(torch.tensor([ids])).logits[0].numpy()

    def llamacpp(path):
        llm = load_llama(path, n_ctx=64, n_threads=1)
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)])

    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:48]
    lowbit_weights()
    export_gguf(twin, tok, tmp_path / "re.gguf", "Q4_0", progress=False,
                dequantize_into_model=True)
    reencoded = logits(twin)
    lowbit_weights()  # block Linears: lowbit's weights; embedding, output: as in the files
    ours = logits(twin)
    res = export_gguf(model, tok, tmp_path / "own.gguf", "Q4_0", progress=False)
    assert len(res["from_codes"]) == 14
    theirs, scale = llamacpp(tmp_path / "own.gguf"), np.abs(ours).max()
    # llama.cpp rounds activations to Q8_0 blocks: 1.7% of the largest logit here; re-encoding
    # the weights moves the logits by 22%
    assert np.abs(theirs - ours).max() < 0.04 * scale
    assert np.abs(reencoded - ours).max() > 0.1 * scale
    assert np.abs(llamacpp(tmp_path / "re.gguf") - reencoded).max() < 0.04 * scale


def test_llamacpp_computes_with_lowbits_ternary_weights(tmp_path):
    """A ternary model (BitNet b1.58 codes, as ``--method qat --scheme ternary`` makes) exported
    as TQ1_0 and as TQ2_0 (384-column rows in Q4_0, llama.cpp's fallback): llama.cpp computes
    the logits of lowbit's weights, as it does for its own formats (activations rounded to Q8
    blocks, and gamma to float16, are the difference)."""
    import lowbit
    from lowbit.runtime.qlinear import QLinear

    tok = tiny_tokenizer()
    model, twin = tiny_llama(hidden=384), tiny_llama(hidden=384)
    lowbit.quantize(model, lowbit.shorthand("rtn", "ternary"), None, progress=False)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, QLinear):
                twin.get_submodule(name).weight.copy_(mod.dequantized_weight())
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:48]
    with torch.no_grad():
        ours = twin(torch.tensor([ids])).logits[0].numpy()
    for qtype in ("native", "TQ2_0"):
        res = export_gguf(model, tok, tmp_path / f"{qtype}.gguf", qtype, progress=False)
        assert len(res["from_codes"]) == 14
        llm = load_llama(tmp_path / f"{qtype}.gguf", n_ctx=64, n_threads=1)
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)])
        assert np.abs(theirs - ours).max() < 0.04 * np.abs(ours).max(), qtype


def test_llamacpp_computes_with_chosen_types(tmp_path):
    """Per-tensor types over a preset (what ``export --target-bpw`` writes): the file holds
    them, and llama.cpp's logits are those of the weights as written (decoded back into the
    model by the export)."""
    tok = tiny_tokenizer()
    model = tiny_llama(hidden=256)
    pick = {"model.layers.0.self_attn.v_proj": "Q8_0", "model.layers.1.mlp.down_proj": "Q6_K",
            "model.layers.0.mlp.gate_proj": "Q2_K"}
    out = tmp_path / "mixed.gguf"
    export_gguf(model, tok, out, "Q4_0", progress=False, dequantize_into_model=True,
                type_overrides=pick)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.ffn_gate.weight"] == "Q2_K" and types["blk.1.attn_v.weight"] == "Q4_0"
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:48]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    llm = load_llama(out, n_ctx=64, n_threads=1)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    # llama.cpp rounds activations to Q8_0 blocks (see the test above)
    assert np.abs(theirs - ours).max() < 0.04 * np.abs(ours).max()


def test_imatrix_means_the_same_to_llamacpp(tmp_path):
    """llama.cpp's own quantizer, given lowbit's importance matrix (as llama-quantize passes a
    loaded file), picks the same type for every tensor and writes the same K-quant bytes as
    lowbit's export; without the matrix every byte matches."""
    model, tok = tiny_llama(hidden=256), tiny_tokenizer()
    f32 = tmp_path / "f32.gguf"
    export_gguf(model, tok, f32, "F32", progress=False)
    ids = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    im = collect_imatrix(model, ids, progress=False)
    for imatrix in (None, im):
        ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
        export_gguf(model, tok, ours, "Q4_K_M", imatrix=imatrix, progress=False)
        llamacpp_quantize(f32, theirs, "Q4_K_M", imatrix=None if imatrix is None else im.data)
        a, b = _tensor_bytes(ours), _tensor_bytes(theirs)
        assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
        assert a == b


# texts for the SentencePiece-style tokenizers: spaces at the start and in runs, newlines and a
# tab (byte tokens), digits, characters the pieces lack (UTF-8 bytes), an added token
SPM_TEXTS = [
    "hello world",
    " hello world",
    "   three leading spaces",
    "the  fox   said\n\nnothing\n",
    "a\tb",
    "numbers 0123456789, 2024 and 12345",
    "café über 日本 ß 😀 x",
    "hello<|user|>world",
    "trailing space ",
    " ",
    "",
]
_rng = random.Random(0)  # and random strings, where merge order matters more than in words
SPM_TEXTS += ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz   ,.0123\né日") for _ in range(30))
              for _ in range(200)]  # fmt: skip
SPM_CASES = {  # family, tiny_spm_tokenizer arguments
    "llama2": ("llama", {}),
    "gemma": ("gemma", {"gemma": True}),
    "llama-metaspace": ("llama", {"metaspace": True}),
}


def _detokenize(llm, ids: list[int]) -> str:
    """llama.cpp's own detokenization of text tokens: the space it prefixed, if it does, is
    removed (when the ids start with BOS, llama_detokenize keeps that space)."""
    import llama_cpp

    arr = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, 4096, False, False)
    assert 0 <= n < 4096
    return buf.raw[:n].decode("utf-8")


@pytest.mark.parametrize("case", list(SPM_CASES))
def test_sentencepiece_tokenizer_in_llamacpp(tmp_path, case):
    """A SentencePiece-style tokenizer built from transformers: llama.cpp splits each text into
    the ids transformers gives (BOS included) and detokenizes them into transformers' text,
    which is the text itself (but for Llama 2's space after an added token); with the merge ranks
    as scores (the gguf package's -1000 for every token splits 2 or 3 of the 200 random strings
    differently). The exception is
    transformers' own Llama tokenizer (a Metaspace pre-tokenizer, what transformers 5 turns Llama
    2's tokenizer.json into): it does not double the "▁" of a text that starts with a space,
    nor add one after an added token, where llama.cpp does as SentencePiece (and Llama 2's
    tokenizer.json) do; there llama.cpp gives the ids of the Llama 2 layout."""
    family, kw = SPM_CASES[case]
    tok = tiny_spm_tokenizer(**kw)
    out = tmp_path / f"{case}.gguf"
    export_gguf(tiny_family(family, hidden=64, vocab=512), tok, out, "F32", progress=False)
    llm = load_llama(out, n_ctx=64)
    sentencepiece = tiny_spm_tokenizer() if kw.get("metaspace") else tok
    for text in SPM_TEXTS:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        differs = kw.get("metaspace") and (text.startswith(" ") or "<|user|>" in text)
        assert ids == (sentencepiece if differs else tok)(text)["input_ids"], text
        want = sentencepiece.decode(ids, skip_special_tokens=True)
        assert ids[0] == tok.bos_token_id and _detokenize(llm, ids[1:]) == want, text
        if "<|user|>" not in text:
            assert want == text


def test_eval_llamacpp_gives_the_same_statistics():
    """`lowbit eval FILE.gguf --llamacpp` takes the logits from llama.cpp and computes the same
    statistics as lowbit's own reading of the file: on the built-in GGUF against itself (read
    by lowbit) the two agree closely."""
    import json

    from cli_helpers import lowbit_cli

    args = ["--data", str(WIKI), "--windows", "2", "--seq-len", "128", "--base", "smollm2-135m",
            "--json", "-", "--quiet"]
    ours = json.loads(lowbit_cli("eval", "smollm2-135m", *args).out)
    theirs = json.loads(lowbit_cli("eval", "smollm2-135m", "--llamacpp", *args).out)
    assert theirs["kernel"] == {"llama.cpp": 1} and theirs["tokens"] == ours["tokens"] == 254
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=0.01)
    assert ours["kld_mean"] < 1e-3 and 0 < theirs["kld_mean"] < 0.02
    assert theirs["same_top_p"] > 0.9 and theirs["rms_dp"] < 0.05
    assert {"kld_median", "kld_p99", "kld_p999", "ppl_ratio", "cor_ln_ppl"} <= set(theirs)
