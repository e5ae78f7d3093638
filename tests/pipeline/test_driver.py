"""The sequential driver: exact with quantization off, no state carried between calls."""

import pytest
import torch
from conftest import FAMILIES, tiny_model
from driver_helpers import last_block_output

from lowbit.api import quantize_model
from lowbit.arch import get_blocks, spec_for
from lowbit.errors import LowbitError
from lowbit.pipeline.driver import capture_inputs, clean_block_kwargs, run_sequential


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

    def noop(bi, modules, stats):
        seen.append((bi, tuple(modules)))
        assert all(s.n == windows.numel() for s in stats.values())
        return {}

    hidden = run_sequential(model, spec, windows, noop, chunk=2, progress=False, resume=resume)
    assert torch.allclose(torch.cat(hidden), ref, atol=1e-5, rtol=1e-4)
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

        def grab(bi, modules, st, hs=hs):
            hs.extend(s.h.clone() for s in st.values())
            for m in modules.values():  # a real change, so that later inputs depend on it
                m.weight.data.mul_(0.9).add_(0.01)
            return {}

        out = run_sequential(model, spec, windows, grab, chunk=2, progress=False, resume=resume)
        stats[resume] = (hs, torch.cat(out))
    for a, b in zip(stats[True][0], stats[False][0], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert torch.allclose(stats[True][1], stats[False][1], rtol=1e-4, atol=1e-4)


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
    res = quantize_model(model, "gptq", "w3g32", windows, progress=False)
    assert len(res.qweights) == 14
    assert all(r["loss"] < r["rtn_loss"] for r in res.rows)
    assert {"name", "shape", "tokens", "seconds", "loss"} <= set(res.rows[0])
    # the model now computes with the quantized weights
    name = next(iter(res.qweights))
    w = model.get_submodule(name).weight
    assert torch.equal(w, res.qweights[name].dequantize())


def test_nonfinite_activations_name_the_layer(windows):
    model = tiny_model("llama")
    with torch.no_grad():
        get_blocks(model, spec_for(model))[1].self_attn.o_proj.weight.fill_(float("inf"))
    with pytest.raises(LowbitError, match="block 1"):
        quantize_model(model, "gptq", "w4g32", windows, progress=False)


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
        quantize_model(model, "rtn", "w4g32")
