"""The sequential driver: exact with quantization off, no state carried between calls."""

import pytest
import torch
from conftest import FAMILIES, tiny_model
from driver_helpers import Visitor, last_block_output

import lowbit
from lowbit.arch import get_blocks, spec_for
from lowbit.errors import LowbitError
from lowbit.pipeline.driver import (
    capture_inputs,
    clean_block_kwargs,
    observe_model,
    run_sequential,
)


@pytest.mark.parametrize("resume", [True, False])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blockwise_run_reproduces_the_model(family, resume, windows):
    """Every group's early-stopped pass and every block re-run (or the resumed schedule),
    with a no-op quantizer, gives the full model's last hidden states (hence its logits) to
    float tolerance."""
    model = tiny_model(family)
    spec = spec_for(model)
    ref = last_block_output(model, windows)
    seen = []

    def noop(ctx, group, stats):
        seen.append((ctx.index, group))
        assert stats.n == windows.numel()

    out = run_sequential(model, spec, windows, Visitor(noop), chunk=2, progress=False,
                         resume=resume)
    assert torch.allclose(torch.cat(out.hidden), ref, atol=1e-5, rtol=1e-4)
    assert len(seen) == len(get_blocks(model, spec)) * len(spec.groups)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gemma"])
def test_resumed_schedule_matches_rerunning_the_block(family, windows):
    """The resumed schedule (captured residual stream plus the quantized Linear's change)
    quantizes every Linear from the same statistics as re-running the block per group."""
    stats = {}
    for resume in (True, False):
        model = tiny_model(family)
        spec = spec_for(model)
        hs = []

        def grab(ctx, group, st, hs=hs):
            hs.append(st.h.clone())
            for n in group:  # a real change, so that later inputs depend on it
                ctx.linears[n].weight.data.mul_(0.9).add_(0.01)

        out = run_sequential(model, spec, windows, Visitor(grab), chunk=2, progress=False,
                             resume=resume)
        stats[resume] = (hs, torch.cat(out.hidden))
    for a, b in zip(stats[True][0], stats[False][0], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert torch.allclose(stats[True][1], stats[False][1], rtol=1e-4, atol=1e-4)


def test_schedule_fallback_is_a_printed_note(windows, capsys):
    model = tiny_model("opt")
    run_sequential(model, spec_for(model), windows, Visitor(lambda *a: None), chunk=3,
                   progress=False)
    err = capsys.readouterr().err
    assert err.count("note: opt blocks are re-run") == 1


def test_observe_model_matches_hooks_on_the_full_model(windows):
    """The driver's statistics of every Linear input equal hooks on one plain forward."""
    model = tiny_model("llama")
    stats = observe_model(model, spec_for(model), windows, {"hessian", "absmax"}, chunk=4,
                          progress=False)
    ref = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: ref.setdefault(n, a[0]))
               for n, m in model.named_modules() if n in stats]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    assert set(ref) == set(stats) and len(stats) == 14
    for n, x in ref.items():
        x = x.reshape(-1, x.shape[-1])
        assert torch.allclose(stats[n].absmax, x.abs().amax(0), rtol=1e-5, atol=1e-6)
        h = 2 * x.T @ x / x.shape[0]
        assert torch.allclose(stats[n].h, h, rtol=1e-4, atol=1e-5 * float(h.abs().max()))


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3"])
def test_each_kind_of_block_gets_its_own_arguments(family, windows):
    """Gemma 3's global blocks (every 6th) get another mask and RoPE than its sliding ones:
    the driver replays to each block what the model gives that kind of block, so the blockwise
    run reproduces a model whose sliding window (8) is shorter than the windows (32)."""
    import transformers as tf
    from conftest import TINY, tiny_gemma3_config

    text = dict(head_dim=16, num_hidden_layers=6, sliding_window=8)
    cfg = (tf.Gemma3TextConfig(**(TINY | text)) if family == "gemma3_text"
           else tiny_gemma3_config(**text))
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    spec = spec_for(model)
    cap = capture_inputs(model, spec, windows, chunk=4)
    assert cap.layer_types[-1] == "full_attention" and len(cap.by_type) == 2
    ref = last_block_output(model, windows)
    out = run_sequential(model, spec, windows, Visitor(lambda *_: None), chunk=4,
                         progress=False)
    assert torch.allclose(torch.cat(out.hidden), ref, atol=1e-5, rtol=1e-4)


def test_captured_kwargs_hold_no_cache(windows):
    model = tiny_model("llama")
    cap = capture_inputs(model, spec_for(model), windows, chunk=3)
    assert len(cap.hidden) == 2
    for kw in cap.kwargs:
        for k, v in kw.items():
            assert "cache" not in type(v).__name__.lower(), k
            assert k not in ("past_key_value", "past_key_values")


def test_clean_block_kwargs_drops_state():
    class DynamicCache:
        pass

    kw = clean_block_kwargs(
        {
            "past_key_values": DynamicCache(),
            "use_cache": True,
            "attention_mask": None,
            "other": DynamicCache(),
        }
    )
    assert kw == {"attention_mask": None, "use_cache": False}


def test_gptq_on_tiny_model_beats_rtn_per_layer(windows):
    model = tiny_model("llama")
    res = lowbit.quantize(model, [lowbit.GPTQ(scheme="w3g32")], windows, progress=False)
    assert len(res.weights) == 14
    rows = [r for r in res.rows if "loss" in r]
    assert len(rows) == 14
    # the loss is measured against the weight before rounding, not the rounded one
    assert all(0 < r["loss"] < r["rtn_loss"] for r in rows)
    assert {"name", "shape", "tokens", "seconds", "loss", "damp", "act_order"} <= set(rows[0])
    # the model now computes with the quantized weights (a QLinear in the Linear's place)
    name = next(iter(res.weights))
    w = model.get_submodule(name).dequantized_weight()
    assert torch.equal(w, res.weights[name].dequantize())


def test_nonfinite_weights_are_refused_before_any_work(windows):
    model = tiny_model("llama")
    with torch.no_grad():
        get_blocks(model, spec_for(model))[1].self_attn.o_proj.weight[0, :3] = float("inf")
    with pytest.raises(LowbitError, match="model.layers.1.self_attn.o_proj: .* 3 inf"):
        lowbit.quantize(model, [lowbit.GPTQ(scheme="w4g32")], windows, progress=False)


def test_nonfinite_activations_name_the_block(windows):
    model = tiny_model("llama")
    with torch.no_grad():
        get_blocks(model, spec_for(model))[1].post_attention_layernorm.weight.fill_(float("inf"))
    with pytest.raises(LowbitError, match="block 1"):
        lowbit.quantize(model, [lowbit.GPTQ(scheme="w4g32")], windows, progress=False)


def test_unknown_family_is_named():
    import transformers as tf

    cfg = tf.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        is_decoder=True,
    )
    model = tf.BertLMHeadModel(cfg)
    with pytest.raises(LowbitError, match="unsupported model family 'bert'.*llama"):
        lowbit.quantize(model, [lowbit.RTN(scheme="w4g32")])
