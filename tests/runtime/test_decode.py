"""The static-cache decode loop against a full forward pass (greedy tokens are the argmax of
the teacher-forced logits), on every family; sampling, stop tokens and limits; and the
``lowbit generate`` command on a tiny checkpoint and its quantized folder."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import lowbit_cli, one_line_error
from conftest import FAMILIES, MOE_FAMILIES, tiny_model

from lowbit.errors import LowbitError
from lowbit.runtime import cpu
from lowbit.runtime.cpu import runnable
from lowbit.runtime.decode import Timing, generate
from lowbit.runtime.kernels import prepare_kernels

TEXT_FAMILIES = [f for f in (*FAMILIES, *MOE_FAMILIES) if f != "gemma3"]


def teacher_forced(model, prompt, tokens) -> list[int]:
    seq = torch.cat([prompt, torch.tensor([tokens])], 1)
    with torch.no_grad():
        logits = model(seq).logits[0, prompt.shape[1] - 1 : -1]
    return logits.argmax(-1).tolist()


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_greedy_tokens_are_the_full_passes_argmax(family):
    model = tiny_model(family)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    timing = Timing()
    out = list(generate(model, prompt, 12, timing=timing))
    assert len(out) == 12 and out == teacher_forced(model, prompt, out)
    assert timing.prompt_tokens == 9 and len(timing.decode_s) == 11
    assert timing.decode_tokens_per_s > 0 and timing.prefill_tokens_per_s > 0


def test_decode_attention_equals_transformers_sdpa():
    """One query token with grouped keys/values (4 query heads on 2 key/value heads): the
    grouped product equals transformers' SDPA path with the keys repeated, masked positions
    included; a longer query or a per-head mask goes to transformers' own function."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from lowbit.runtime.decode import decode_attention

    class Attn(torch.nn.Module):
        num_key_value_groups = 2

    g = torch.Generator().manual_seed(0)
    for n in (1, 3):
        q = torch.randn(1, 4, n, 16, generator=g)
        k, v = torch.randn(2, 1, 2, 40, 16, generator=g)
        mask = torch.arange(40).expand(1, 1, n, 40) < 29  # 29 live positions of 40
        out, _ = decode_attention(Attn(), q, k, v, mask, scaling=0.25)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.25).transpose(1, 2)
        assert out.shape == (1, n, 4, 16)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        # the live positions alone give the same: the mask really masks
        live = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k[:, :, :29], 2), repeat_kv(v[:, :, :29], 2), scale=0.25)
        torch.testing.assert_close(out, live.transpose(1, 2), rtol=1e-5, atol=1e-6)


ATTN_SHAPES = [  # (batch, kv heads, query heads per kv head, cache positions, head dim)
    (1, 3, 3, 640, 64),  # SmolLM2's
    (2, 2, 4, 300, 80),  # chunks of 128 and a last partial one; 80 = 64 + 16 columns
    (1, 4, 1, 129, 64),  # no grouping
    (1, 1, 7, 50, 24),  # one kv head (multi-query); columns in no full vector
]


@pytest.mark.parametrize("isa", runnable())
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=str)
def test_decode_attn_equals_sdpa_and_reads_only_live_positions(isa, shape):
    """lowbit's decode attention op against torch's SDPA (keys and values repeated per query
    head), with a bool and the equivalent additive mask; dead positions hold NaN in the op's
    cache, so reading any of them would show."""
    b, h, g, length, d = shape
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(b, h, g, d, generator=gen)
    k, v = torch.randn(2, b, h, length, d, generator=gen)
    live = torch.rand(b, 1, 1, length, generator=gen) < 0.7
    live[..., 0] = True
    live[0, ..., length // 2 :] = False  # a run of dead positions: whole chunks skipped
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(b, h * g, 1, d), k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
        attn_mask=live, scale=0.3).reshape(b, h, g, d)
    nan_k = k.masked_fill(~live.reshape(b, 1, length, 1), float("nan"))
    nan_v = v.masked_fill(~live.reshape(b, 1, length, 1), float("nan"))
    additive = torch.zeros(b, 1, 1, length).masked_fill(~live, float("-inf"))
    for mask in (live, additive):
        out = cpu.ops().decode_attn(q, nan_k, nan_v, mask, 0.3, cpu.ISAS[isa])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_decode_attention_through_the_op_equals_sdpa():
    """``decode_attention`` with lowbit's op (how the Decoder registers it) on transformers'
    shapes: (b, heads, 1, d) queries over a (b, kv heads, L, d) cache."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from lowbit.runtime.decode import decode_attention

    class Attn(torch.nn.Module):
        num_key_value_groups = 2

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 40, 16, generator=g)
    mask = torch.arange(40).expand(1, 1, 1, 40) < 29
    out, _ = decode_attention(Attn(), q, k, v, mask, scaling=0.25, op=cpu.ops().decode_attn,
                              isa=cpu.ISAS[cpu.isa()])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2 soft-caps: eager
def test_the_decoder_switches_sdpa_models_only(family):
    from lowbit.runtime.decode import ATTENTION, Decoder

    model = tiny_model(family)
    before = model.config._attn_implementation
    Decoder(model, 16)
    assert model.config._attn_implementation == (ATTENTION if before == "sdpa" else before)


def test_quantized_kernels_generate_what_the_reference_does(tiny_ckpt, tmp_path):
    from lowbit.models import load_model

    ckpt, _ = tiny_ckpt
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--format", "native",
               "--out", tmp_path / "q", "--quiet")
    model, _ = load_model(tmp_path / "q")
    prompt = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = list(generate(model, prompt, 10))
    assert ref == teacher_forced(model, prompt, ref)
    for kernel in ("lut4", "int4pack"):  # int4pack named: fp32 activations too
        assert prepare_kernels(model, kernel) == {kernel: 14}
        assert list(generate(model, prompt, 10)) == ref


def test_siblings_are_multiplied_by_one_fused_call(tiny_ckpt, tmp_path, monkeypatch):
    """The decoder stacks q/k/v and gate/up into one product each: a step makes 4 kernel calls
    per block instead of 7, with the logits of the separate products, whatever order the
    model calls them in."""
    from torch.profiler import profile

    from lowbit.models import load_model
    from lowbit.runtime import decode
    from lowbit.runtime.decode import Decoder
    from lowbit.runtime.qlinear import QLinear

    ckpt, _ = tiny_ckpt
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--format", "native",
               "--out", tmp_path / "q", "--quiet")
    model, _ = load_model(tmp_path / "q")
    assert prepare_kernels(model, "auto") == {"lut4": 14}
    prompt = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))

    def steps(dec):
        with torch.inference_mode():
            out = [dec.prefill(prompt)]
            with profile() as prof:
                out.append(dec.step(torch.tensor([5]), 6))
            out += [dec.step(torch.tensor([t]), 7 + i) for i, t in enumerate((9, 2, 7))]
        calls = sum(e.count for e in prof.key_averages() if e.key == "lowbit_cpu::lut4_mm")
        return out, calls

    monkeypatch.setattr(decode, "fuse_siblings", lambda m: 0)
    alone, calls = steps(Decoder(model, 16))
    assert calls == 14
    monkeypatch.undo()
    fused, calls = steps(Decoder(model, 16))
    assert calls == 8 and all(torch.equal(a, b) for a, b in zip(alone, fused, strict=True))
    mods = [m for m in model.modules() if isinstance(m, QLinear)]
    assert sum(m._siblings is not None for m in mods) == 10
    # v before q before k: the same products
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, attn.q_proj.in_features)
    with torch.inference_mode():
        v, q, k = attn.v_proj(x), attn.q_proj(x), attn.k_proj(x)
        q2 = attn.q_proj(x.clone())  # another input computes again
    for mod, y in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v), (attn.q_proj, q2)):
        assert torch.equal(y, mod.built_kernel()(x))


@pytest.mark.slow
def test_the_compiled_step_generates_what_the_eager_one_does(tiny_ckpt, tmp_path):
    """torch.compile traces lowbit's kernels as opaque ops (their registered output shapes) and
    compiles the rest of the step: the tokens stay the eager step's."""
    from lowbit.models import load_model

    ckpt, _ = tiny_ckpt
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "nf4", "--out", tmp_path / "q",
               "--quiet")
    model, _ = load_model(tmp_path / "q")
    assert prepare_kernels(model, "auto") == {"lut4": 14}
    prompt = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = list(generate(model, prompt, 10))
    assert list(generate(model, prompt, 10, compile=True)) == ref


def test_sampling_follows_the_seed_and_stop_tokens_end_it():
    model = tiny_model("llama")
    prompt = torch.tensor([[1, 2, 3]])
    a = list(generate(model, prompt, 16, temperature=1.0, seed=3))
    assert a == list(generate(model, prompt, 16, temperature=1.0, seed=3))
    assert a != list(generate(model, prompt, 16, temperature=1.0, seed=4))
    greedy = list(generate(model, prompt, 16))
    cut = list(generate(model, prompt, 16, stop={greedy[4]}))
    assert cut == greedy[: greedy.index(greedy[4]) + 1]


def test_limits_are_one_line_errors():
    model = tiny_model("llama")  # 256 positions
    with pytest.raises(LowbitError, match="256"):
        list(generate(model, torch.zeros(1, 200, dtype=torch.long), 100))
    with pytest.raises(LowbitError, match="at least 1"):
        list(generate(model, torch.zeros(1, 4, dtype=torch.long), 0))


def test_generate_command(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    r = lowbit_cli("generate", ckpt, "--prompt", "The quick brown fox", "--max-new-tokens", "8",
                   "--json", tmp_path / "g.json")
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["new_tokens"] == 8 and res["text"] and res["text"] in r.out
    assert res["decode_tokens_per_s"] > 0 and res["kernel"] == {}  # a float model
    assert "tokens/s" in r.err
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w8", "--out", tmp_path / "q",
               "--quiet")  # compressed-tensors, the default output
    r = lowbit_cli("generate", tmp_path / "q", "--prompt", "The quick", "--max-new-tokens", "4",
                   "--threads", "1", "--json", "-")
    res = json.loads(r.out)
    assert res["kernel"] == {"u8": 14} and res["threads"] == 1


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--max-new-tokens", "100000"], "positions"),
    (["--kernel", "int4pack"], "int4pack kernel cannot multiply"),
])
def test_generate_bad_inputs(tiny_ckpt, tmp_path, args, message):
    ckpt, _ = tiny_ckpt
    target = ckpt
    if "int4pack" in args:
        lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w8", "--out",
                   tmp_path / "q", "--quiet")
        target = tmp_path / "q"
    r = lowbit_cli("generate", target, "--prompt", "hi", *args, ok=False)
    one_line_error(r, message)


def test_chat_keeps_the_conversation(tiny_ckpt, monkeypatch):
    import io

    from lowbit.jobs import TextGenerator

    ckpt, _ = tiny_ckpt
    session = TextGenerator(str(ckpt))
    history: list[dict] = []
    a = session.run("Hello", 4, chat=True, history=history)
    b = session.run("And then?", 4, chat=True, history=history)
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert history[1]["content"] == a["text"] and b["prompt_tokens"] > a["prompt_tokens"] + 4
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd then?\n\n"))
    r = lowbit_cli("chat", ckpt, "--max-new-tokens", "4")
    assert r.out.count("> ") == 3 and a["text"] in r.out
