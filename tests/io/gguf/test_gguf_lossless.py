"""GGUF export of a lowbit integer grid: its codes and scales go into Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
blocks as they are (no second rounding), read back with the gguf package's own dequantizer;
what cannot be carried over is re-encoded and said so; ``--type native``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf_helpers import tiny_llama, tiny_moe, tiny_tokenizer

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats import ggml
from lowbit.formats.grids import get_grid
from lowbit.formats.integer import IntGrid
from lowbit.io.gguf.export import export_gguf, unpermute_qk
from lowbit.io.gguf.lossless import carry, native_type, why_not
from lowbit.io.gguf.presets import PRESETS
from lowbit.io.native import load_quantized, save_quantized
from lowbit.methods.rtn import rtn
from lowbit.recipe import recipe_from_data
from lowbit.runtime.qlinear import QLinear

KINDS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _bound(t: str, gw) -> np.ndarray:
    """What a block may differ from lowbit's weight by: 0 where d (and m) are lowbit's fp16
    scales; half a float16 step of m = -scale * zero (2^-11 |m|) for Q4_1/Q5_1; half a float16
    step of d times the level (2^-11 |x|) for float32 scales; plus float32 rounding."""
    w = gw.dequantize().numpy()
    scale = gw.params["scale"].float()
    zero = gw.params["zero"].float()
    per_col = torch.repeat_interleave  # group -> its columns
    cols = w.shape[1]
    s = per_col(scale, cols // scale.shape[1], dim=1).numpy()
    z = per_col(zero, cols // zero.shape[1], dim=1).numpy()
    m = np.abs(s * z) if t in ggml.AFFINE else 0.0
    d_err = 0.0 if gw.grid.scale_dtype == "float16" else np.abs(w) * 2.0**-11
    return m * 2.0**-11 + d_err + (np.abs(w) + m) * 2.0**-23 + 2.0**-25 * (m > 0)


@pytest.mark.parametrize("scheme,t", [
    ("w4g32", "Q4_0"), ("w4g64", "Q4_0"), ("w4g128", "Q4_0"), ("w4", "Q4_0"), ("w2g32", "Q4_0"),
    ("w3g32-asym", "Q4_0"), ("w4g32", "Q4_1"), ("w4g32", "Q8_0"), ("w4g32-asym", "Q4_1"),
    ("w4g32-asym", "Q5_0"), ("w5g32", "Q5_0"), ("w5g64-asym", "Q5_1"), ("w8", "Q8_0"),
    ("w8-tensor", "Q8_0"), ("w7g32-asym", "Q8_0"), ("w8g32", "Q8_0"),
])
def test_blocks_decode_to_lowbit_weights(scheme, t):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1) + 0.1 * torch.randn(1, 256)
    gw = rtn(w, get_grid(scheme))
    data, why = carry(t, [QLinear(gw)], None)
    assert why == "" and data.shape == (48, 256 // 32 * ggml.GGML_TYPES[t].type_size)
    got = gguf_dequantize(data, ggml.GGML_TYPES[t].type_id).reshape(48, 256)
    np.testing.assert_array_equal(got, ggml.dequantize(t, data, 256))
    want = gw.dequantize().numpy()
    diff = np.abs(got - want)
    assert (diff <= _bound(t, gw)).all(), diff.max()
    if t not in ggml.AFFINE:  # fp16 scales are the blocks' d: nothing is rounded
        np.testing.assert_array_equal(got, want)
    # what re-encoding the dequantized weight does instead (the rule of llama.cpp's quantizer)
    if scheme == "w4g32" and t == "Q4_0":
        again = ggml.dequantize(t, ggml.quantize(t, want), 256)
        assert (again != want).mean() > 0.5


def test_float32_scales_are_rounded_to_float16():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    gw = rtn(w, IntGrid(bits=4, group=32, scale_dtype="float32"))
    data, _ = carry("Q4_0", [QLinear(gw)], None)
    got, want = ggml.dequantize("Q4_0", data, 64), gw.dequantize().numpy()
    assert not np.array_equal(got, want)
    assert (np.abs(got - want) <= np.abs(want) * 2.0**-11 + 2.0**-24).all()


def test_what_cannot_be_carried_over_says_why():
    g = get_grid
    assert "levels -15..15 exceed its -8..7" in why_not("Q4_0", g("w4g32-asym"), 256)
    assert "levels -255..255 exceed its -128..127" in why_not("Q8_0", g("w8g32-asym"), 256)
    assert "codes 0..31 exceed its 0..15" in why_not("Q4_1", g("w5g32"), 256)
    assert "groups of 16 are not whole 32-weight blocks" in why_not("Q4_0", g("w4g16"), 256)
    assert "groups of 48" in why_not("Q8_0", g("w8"), 48)  # one scale per row of 48
    assert "cannot hold integer codes" in why_not("Q4_K", g("w4g32"), 256)
    assert "float type" in why_not("F16", g("w4g32"), 256)
    w = torch.randn(32, 64)
    _, why = carry("Q4_0", [QLinear(rtn(w, g("nf4")))], None)
    assert "not an integer grid" in why
    gw = rtn(w, g("w4g32"))
    gw.g_idx = torch.arange(64, dtype=torch.int32).flip(0) // 32
    assert "act-order" in carry("Q4_0", [QLinear(gw)], None)[1]
    # --type native: the smallest block type that holds the grid
    for scheme, t in [("w4g32", "Q4_0"), ("w3g64-asym", "Q4_0"), ("w4g32-asym", "Q4_1"),
                      ("w5g32", "Q5_0"), ("w5g32-asym", "Q5_1"), ("w6g32", "Q8_0"),
                      ("w8", "Q8_0"), ("w8g32-asym", None), ("w4g16", None), ("nf4", None)]:
        assert native_type([QLinear(rtn(w, g(scheme)))], 64) == t, scheme


def _quantized_folder(tmp_path, tok, method, scheme, calib=None):
    m = tiny_llama(hidden=256)
    res = lowbit.quantize(m, lowbit.shorthand(method, scheme), calib, progress=False)
    folder = save_quantized(tmp_path / "q", m, tok, res.weights, {"method": method})
    return load_quantized(folder)


def _compare(model, path, t_expected: str | None, affine: bool) -> float:
    """Every quantized Linear's GGUF tensor, decoded by the gguf package and un-permuted,
    against the loaded model's weight; the largest difference."""
    r = GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    cfg = model.config
    worst = 0.0
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QLinear):
            continue
        i, kind = name.split(".")[2], KINDS[name.split(".")[-1]]
        t = tensors[f"blk.{i}.{kind}.weight"]
        if t_expected:
            assert t.tensor_type.name == t_expected, t.name
        got = gguf_dequantize(t.data, t.tensor_type).reshape(mod.shape)
        if kind in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
            got = unpermute_qk(got, heads)
        gw = mod.grid_weight()
        want = gw.dequantize().numpy()
        assert (np.abs(got - want) <= _bound(t.tensor_type.name, gw)).all(), t.name
        if not affine:
            np.testing.assert_array_equal(got, want, err_msg=t.name)
        worst = max(worst, float(np.abs(got - want).max()))
        n += 1
    assert n == 14
    return worst


@pytest.mark.parametrize("scheme,qtype,affine", [
    ("w4g32", "Q4_0", False), ("w4g32-asym", "Q4_1", True), ("w8", "Q8_0", False),
    ("w5g64", "Q5_0", False), ("w5g32-asym", "Q5_1", True),
])
def test_rtn_folder_exports_its_own_grid(tmp_path, tok, scheme, qtype, affine):
    model, mtok = _quantized_folder(tmp_path, tok, "rtn", scheme)
    out = tmp_path / "m.gguf"
    res = export_gguf(model, mtok, out, qtype, progress=False)
    assert len(res["from_codes"]) == 14 and not res["reencoded"]
    assert res["note"] == ("of 14 quantized weight tensors, 14 written from lowbit's codes and "
                           "scales as they are")
    worst = _compare(model, out, qtype, affine)
    assert (worst > 0) == affine


def test_gptq_weights_survive_q4_0(tmp_path, tok):
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    model, mtok = _quantized_folder(tmp_path, tok, "gptq", "w4g32", ids)
    out = tmp_path / "g.gguf"
    export_gguf(model, mtok, out, "Q4_0", progress=False)
    assert _compare(model, out, "Q4_0", affine=False) == 0.0


def test_types_that_cannot_hold_the_grid_are_re_encoded_and_noted(tmp_path, tok):
    from click.testing import CliRunner

    from lowbit.cli import cli

    m = tiny_llama(hidden=256)
    res = lowbit.quantize(m, lowbit.shorthand("rtn", "w4g32"), None, progress=False)
    folder = save_quantized(tmp_path / "q", m, tok, res.weights, {"method": "rtn"})
    out = tmp_path / "k.gguf"
    r = CliRunner().invoke(cli, ["export", str(folder), str(out), "--type", "Q4_K_M", "--quiet"])
    assert r.exit_code == 0, r.output
    # Q4_K_M: Q4_K, and Q6_K for attn_v and ffn_down of one of the 2 blocks
    assert ("note: of 14 quantized weight tensors, 14 re-encoded from their dequantized "
            "weights, so rounded a second time: 12 as Q4_K (its blocks cannot hold integer "
            "codes and scales as they are), 2 as Q6_K (its blocks") in r.output
    # re-encoded as before: llama.cpp's rule applied to the dequantized weight
    reader = GGUFReader(out)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    want = m.model.layers[0].mlp.gate_proj.dequantized_weight().numpy()
    np.testing.assert_array_equal(t.data.reshape(want.shape[0], -1),
                                  ggml.quantize(t.tensor_type.name, want))
    # a mixed model: ffn_down's w4g16 cannot be Q4_0 blocks, the other Linears are
    m = tiny_llama(hidden=256)
    recipe = recipe_from_data([{"rtn": {"scheme": "w4g32",
                                        "overrides": {"re:.*down_proj": "w4g16"}}}])
    lowbit.quantize(m, recipe, None, progress=False)
    res = export_gguf(m, tok, tmp_path / "mixed.gguf", "Q4_0", progress=False)
    assert res["note"] == (
        "of 14 quantized weight tensors, 12 written from lowbit's codes and scales as they are; "
        "2 re-encoded from their dequantized weights, so rounded a second time: 2 as Q4_0 "
        "(w4g16's groups of 16 are not whole 32-weight blocks)")


def test_native_type_follows_each_grid(tmp_path, tok):
    model, mtok = _quantized_folder(tmp_path, tok, "rtn", "w4g32-asym")
    out = tmp_path / "n.gguf"
    res = export_gguf(model, mtok, out, "native", progress=False)
    assert res["qtype"] == "native (Q4_1 rules)"
    r = GGUFReader(out)
    assert r.fields["general.file_type"].contents() == PRESETS["Q4_1"].ftype
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "Q4_1" and types["output.weight"] == "Q6_K"
    _compare(model, out, "Q4_1", affine=True)
    assert export_gguf(model, mtok, tmp_path / "f.gguf", "F16", progress=False)["note"] is None
    with pytest.raises(LowbitError, match="no quantized weight a llama.cpp block type holds"):
        export_gguf(tiny_llama(hidden=256), tok, tmp_path / "f.gguf", "native", progress=False)


def test_moe_experts_are_carried_over(tmp_path, tok):
    m = tiny_moe("qwen3_moe")
    lowbit.quantize(m, lowbit.shorthand("rtn", "w4g32"), None, progress=False)
    out = tmp_path / "moe.gguf"
    res = export_gguf(m, tok, out, "Q4_0", progress=False)
    assert any("exps" in n for n in res["from_codes"]), res["reencoded"]
    r = GGUFReader(out)
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down_exps.weight")
    got = gguf_dequantize(t.data, t.tensor_type)
    experts = m.model.layers[1].mlp.experts
    want = np.stack([e.down_proj.dequantized_weight().numpy() for e in experts])
    np.testing.assert_array_equal(got.reshape(want.shape), want)


@pytest.mark.parametrize("t", ["TQ1_0", "TQ2_0", "Q4_0", "Q5_0", "Q8_0"])
def test_ternary_blocks_hold_the_codes(t):
    """A ternary weight's codes go into the blocks as they are, gamma as every block's d (the
    gguf package decodes them); gamma's float16 rounding is the only difference."""
    torch.manual_seed(2)
    gw = rtn(torch.randn(24, 512), get_grid("ternary"))
    data, why = carry(t, [QLinear(gw)], None)
    assert why == ""
    got = gguf_dequantize(data, ggml.GGML_TYPES[t].type_id).reshape(24, 512)
    np.testing.assert_array_equal(got, ggml.dequantize(t, data, 512))
    d = np.float32(np.float16(float(gw.params["gamma"].flatten()[0])))
    np.testing.assert_array_equal(got, gw.codes.numpy().astype(np.float32) * d)
    want = gw.dequantize().numpy()
    assert (np.abs(got - want) <= np.abs(want) * 2.0**-11).all()
    if t.startswith("TQ"):  # the size llama.cpp's type has: 1.6875 or 2.0625 bits per weight
        assert data.nbytes * 8 / gw.codes.numel() == ggml.bits_per_weight(t)
        # llama.cpp's own quantizer picks d = max |x| per block: the same codes here
        np.testing.assert_array_equal(ggml.quantize(t, want), ggml.quantize(t, got))
    assert "ternary weights go into" in why_not("Q4_1", get_grid("ternary"), 512)
    assert "not whole 256-weight blocks" in why_not("TQ1_0", get_grid("ternary"), 384)
    assert "holds ternary weights, not w2g32" in why_not("TQ2_0", get_grid("w2g32"), 512)


def test_ternary_model_exports_as_tq_with_llama_cpps_fallback(tmp_path, tok):
    """--type native of a ternary model: TQ1_0 (file type MOSTLY_TQ1_0), rows llama.cpp's TQ
    blocks do not divide (384) in Q4_0 as llama.cpp falls back, every tensor from the codes."""
    m = tiny_llama(hidden=384)
    lowbit.quantize(m, lowbit.shorthand("rtn", "ternary"), None, progress=False)
    res = export_gguf(m, tok, tmp_path / "t.gguf", "native", progress=False)
    assert res["qtype"] == "native (TQ1_0 rules)" and len(res["from_codes"]) == 14
    r = GGUFReader(tmp_path / "t.gguf")
    assert r.fields["general.file_type"].contents() == PRESETS["TQ1_0"].ftype
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == "TQ1_0"  # 768 columns
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q4_0"  # 384
    for name, mod in m.named_modules():
        if isinstance(mod, QLinear):
            i, kind = name.split(".")[2], KINDS[name.split(".")[-1]]
            t = next(t for t in r.tensors if t.name == f"blk.{i}.{kind}.weight")
            got = gguf_dequantize(t.data, t.tensor_type).reshape(mod.shape)
            if kind in ("attn_q", "attn_k"):
                heads = m.config.num_attention_heads if kind == "attn_q" else \
                    m.config.num_key_value_heads
                got = unpermute_qk(got, heads)
            want = mod.dequantized_weight().numpy()
            assert (np.abs(got - want) <= np.abs(want) * 2.0**-11).all(), name
