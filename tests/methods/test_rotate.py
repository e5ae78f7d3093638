"""Rotations keep the full-precision function on every family that takes them (logits equal
to fp32 rounding, norms with random scales so folding them is really tested), refuse the rest
with the reason, and run from the command line as a step of a recipe whose output reloads and
loads in transformers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cli_helpers import lowbit_cli, one_line_error
from conftest import FAMILIES, MOE_FAMILIES, tiny_model
from test_awq import logits, randomize_norms

from lowbit.arch import get_blocks, language_model, spec_for
from lowbit.errors import LowbitError
from lowbit.methods.rotate import Rotate

R1_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}
R1_REFUSED = {"gemma2": "normalise them first", "gemma3_text": "normalise them first",
              "gemma3": "normalise them first", "opt": "LayerNorm", "gpt2": "LayerNorm",
              "mixtral": "mixture-of-experts", "qwen2_moe": "mixture-of-experts",
              "qwen3_moe": "mixture-of-experts"}


def rotated(family: str, **opts):
    model = tiny_model(family)
    randomize_norms(model)
    before = copy.deepcopy(model)
    lm = language_model(model)
    rows = Rotate(**opts).transform_model(lm, spec_for(lm))
    return before, model, rows


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_rotations_keep_the_function_or_say_why_not(family, windows):
    if family in R1_REFUSED:
        with pytest.raises(LowbitError, match=R1_REFUSED[family]):
            rotated(family)
    else:
        before, after, rows = rotated(family)
        assert rows[0]["r1"] == "hadamard 2^6" and rows[0]["r2"] == "hadamard 2^4"
        ref = logits(before, windows)
        torch.testing.assert_close(logits(after, windows), ref, rtol=0,
                                   atol=2e-6 * float(ref.abs().max()))
        emb = after.get_input_embeddings().weight
        assert not torch.allclose(emb, before.get_input_embeddings().weight, atol=1e-3)
    if family == "gpt2":  # Conv1D attention
        with pytest.raises(LowbitError, match="Conv1D"):
            rotated(family, r1=False)
        return
    if family in R1_FAMILIES:  # R4 online, float Linear with its input rotated by a hook
        before, after, rows = rotated(family, online=True)
        ref = logits(before, windows)
        torch.testing.assert_close(logits(after, windows), ref, rtol=0,
                                   atol=4e-6 * float(ref.abs().max()))
        spec = spec_for(after)
        down = get_blocks(after, spec)[0].get_submodule(spec.groups[3][0])
        assert rows[0]["r4"].startswith("hadamard") and down.in_rotation.n == down.in_features
    if family not in MOE_FAMILIES and family != "gpt2":  # incoherence: any plain Linear
        before, after, rows = rotated(family, r1=False, r2=False, incoherent=True)
        ref = logits(before, windows)
        torch.testing.assert_close(logits(after, windows), ref, rtol=0,
                                   atol=4e-6 * float(ref.abs().max()))
        assert rows[0]["incoherent"].startswith("hadamard")
    before, after, rows = rotated(family, r1=False)  # R2 alone: every other family
    assert "r1" not in rows[0]
    ref = logits(before, windows)
    torch.testing.assert_close(logits(after, windows), ref, rtol=0,
                               atol=2e-6 * float(ref.abs().max()))


def test_norm_scales_move_into_the_linears_and_tied_embeddings_are_untied():
    _, model, rows = rotated("gemma")  # tied embeddings; norms multiply by 1 + weight
    assert rows[0]["untied"] and not model.config.tie_word_embeddings
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.data_ptr() != emb.weight.data_ptr()
    spec = spec_for(model)
    for block in get_blocks(model, spec):
        for norm in spec.norm_feeds:
            assert bool((block.get_submodule(norm).weight == 0).all())  # 1 + 0
    with pytest.raises(LowbitError, match="nothing to rotate"):
        Rotate(r1=False, r2=False)


def test_the_seed_draws_the_signs():
    a, b = (rotated("llama", seed=s)[1] for s in (0, 1))
    assert not torch.equal(a.get_input_embeddings().weight, b.get_input_embeddings().weight)
    c = rotated("llama", seed=0)[1]
    assert torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)


def test_rotate_then_gptq_from_the_command_line(tiny_ckpt, tmp_path):
    """``--rotate`` (GPTQ by default): the recipe (with its seed) is recorded, the rotated model is
    an ordinary compressed-tensors checkpoint (untied head) that lowbit and transformers both
    load to the same logits, close to the unrotated model's."""
    import transformers as tf

    from lowbit.models import load_model

    ckpt, text = tiny_ckpt
    out = tmp_path / "q"
    lowbit_cli("quantize", ckpt, "--rotate", "--scheme", "w8", "--calib", text,
               "--calib-samples", "8", "--seq-len", "64", "--out", out, "--quiet")
    desc = json.loads((out / "lowbit.json").read_text())
    assert desc["recipe"]["steps"][0] == {"step": "rotate", "targets": ["Linear"],
                                         "ignore": ["lm_head"], "r1": True, "r2": True,
                                         "online": False, "incoherent": False, "seed": 0}
    rows = [json.loads(x) for x in (out / "layers.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == "rotate" and rows[0]["untied"]
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    base = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ours, _ = load_model(out, "fp32")
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hf.config.tie_word_embeddings
    a, b, ref = (logits(m, ids) for m in (ours, hf, base))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert float((a - ref).abs().max()) < 0.05 * float(ref.abs().max())  # w8: close


def test_a_family_r1_cannot_take_is_a_one_line_error(tmp_path):
    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "opt")
    r = lowbit_cli("quantize", tmp_path / "opt", "--rotate", "--method", "rtn", "--scheme", "w8",
                   "--out", tmp_path / "q", ok=False)
    one_line_error(r, "LayerNorm subtracts the mean")
    assert not (tmp_path / "q").exists()


def test_a_budget_with_a_rotation_is_refused(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    r = lowbit_cli("quantize", ckpt, "--rotate", "--target-bpw", "3.5", "--out",
                   tmp_path / "q", ok=False)
    one_line_error(r, "--rotate with --target-bpw")


def test_online_rotation_from_the_command_line(tiny_ckpt, tmp_path):
    """``--rotate --rotate-online``: down_proj's rounded weight is in the rotated basis and its
    input is rotated at run time; lowbit.json records the rotation per layer, the folder reloads
    to the same logits (through the kernels too), and the formats that cannot hold a run-time
    rotation refuse it in one line (auto picks native and says why)."""
    from lowbit.models import load_model
    from lowbit.runtime.qlinear import online_rotated

    ckpt, text = tiny_ckpt
    out = tmp_path / "q"
    r = lowbit_cli("quantize", ckpt, "--rotate", "--rotate-online", "--method", "rtn",
                   "--scheme", "w8", "--out", out, "--quiet")
    assert "format: native" in r.err and "transform_config" in r.err
    desc = json.loads((out / "lowbit.json").read_text())
    assert desc["recipe"]["steps"][0]["online"] is True
    downs = {k: v for k, v in desc["layers"].items() if k.endswith("down_proj")}
    assert downs and all(v["input_rotation"]["kind"] == "hadamard" for v in downs.values())
    assert not any("input_rotation" in v for k, v in desc["layers"].items() if k not in downs)
    ours, _ = load_model(out, "fp32")
    assert sorted(online_rotated(ours)) == sorted(downs)
    base = tiny_model_from(ckpt)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    a, ref = logits(ours, ids), logits(base, ids)
    assert float((a - ref).abs().max()) < 0.05 * float(ref.abs().max())  # w8: close
    one = lowbit_cli("export", out, tmp_path / "q.gguf", ok=False)
    one_line_error(one, "rotated at run time")
    ct = lowbit_cli("quantize", ckpt, "--rotate", "--rotate-online", "--method", "rtn",
                    "--scheme", "w8", "--format", "compressed-tensors", "--out",
                    tmp_path / "ct", ok=False)
    one_line_error(ct, "transform_config")
    assert not (tmp_path / "ct").exists()
    alone = lowbit_cli("quantize", ckpt, "--rotate-online", "--out", tmp_path / "x", ok=False)
    one_line_error(alone, "give --rotate too")


def tiny_model_from(ckpt):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)


def test_online_rotation_refuses_what_would_break_it(tiny_ckpt):
    """A scaling step between up_proj and down_proj, or a down_proj left in full precision,
    would not survive the run-time rotation: refused before any work."""
    from lowbit.api import quantize

    ckpt, _ = tiny_ckpt
    for recipe, match in (
        ({"steps": [{"step": "rotate", "online": True}, {"step": "awq"},
                    {"step": "rtn", "scheme": "w4g64"}]}, "awq scales"),
        ({"steps": [{"step": "rotate", "online": True},
                    {"step": "rtn", "scheme": "w4g64", "ignore": ["lm_head", "re:.*down_proj"]}]},
         "not quantized"),
    ):
        with pytest.raises(LowbitError, match=match):
            quantize(tiny_model_from(ckpt), recipe, calib=torch.randint(0, 100, (2, 16)))


def test_incoherence_from_the_command_line(tiny_ckpt, tmp_path):
    """``--incoherence``: every block Linear is stored as ``R_out W R_in`` with both rotations
    recorded; the folder reloads to logits close to the base's at w8 (a missing or misapplied
    rotation would scramble them), also through the compiled kernels' path."""
    from lowbit.models import load_model
    from lowbit.runtime.qlinear import QLinear

    ckpt, _ = tiny_ckpt
    out = tmp_path / "q"
    lowbit_cli("quantize", ckpt, "--incoherence", "--method", "rtn", "--scheme", "w8", "--out",
               out, "--quiet")
    desc = json.loads((out / "lowbit.json").read_text())
    step = desc["recipe"]["steps"][0]
    assert (step["r1"], step["r2"], step["incoherent"]) == (False, False, True)
    blocks = {k: v for k, v in desc["layers"].items() if k != "lm_head"}
    assert blocks and all({"input_rotation", "output_rotation"} <= set(v) for v in
                          blocks.values())
    ours, _ = load_model(out, "fp32")
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    a, ref = logits(ours, ids), logits(tiny_model_from(ckpt), ids)
    assert float((a - ref).abs().max()) < 0.05 * float(ref.abs().max())
    for m in ours.modules():
        if isinstance(m, QLinear):
            m.use_kernel("u8")  # one token at a time goes through the kernel
    x = ids[:, :1]
    torch.testing.assert_close(logits(ours, x), a[:, :1], rtol=1e-4, atol=1e-4)


def test_incoherence_keeps_a_layernorm_family(windows):
    """Incoherence changes each Linear alone, so OPT (whose LayerNorm refuses R1) takes it:
    the rotated fp32 model computes the same, and w8 after it stays close."""
    import lowbit

    before, after, _ = rotated("opt", r1=False, r2=False, incoherent=True)
    ref = logits(before, windows)
    torch.testing.assert_close(logits(after, windows), ref, rtol=0,
                               atol=4e-6 * float(ref.abs().max()))
    model = copy.deepcopy(before)
    lowbit.quantize(model, {"steps": [{"step": "rotate", "r1": False, "r2": False,
                                       "incoherent": True}, {"step": "rtn", "scheme": "w8"}]},
                    progress=False)
    got = logits(model, windows)
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())
