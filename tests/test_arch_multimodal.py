"""Multimodal Gemma 3 (Gemma 3 >= 4B: ``Gemma3ForConditionalGeneration``): its language model
is quantized from text-only calibration, the vision tower and projector are kept as they are;
the native folder and the compressed-tensors export load back with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from cli_helpers import lowbit_cli
from gguf_helpers import tiny_family, tiny_tokenizer
from torch import nn

from lowbit.arch import get_blocks, language_model, spec_for
from lowbit.jobs import Calibration, quantize_job
from lowbit.models import load_model
from lowbit.recipe import shorthand
from lowbit.runtime.qlinear import QLinear

LM = "model.language_model."
VISION = ("model.vision_tower.", "model.multi_modal_projector.")
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny multimodal Gemma 3 folder (6 blocks: 5 sliding, 1 global; saved by transformers,
    so under its on-disk names) with a tokenizer and a calibration text."""
    d = tmp_path_factory.mktemp("gemma3mm")
    model = tiny_family("gemma3", hidden=64)
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    text = d / "calib.txt"
    text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog"
                              for i in range(400)))
    return d, text


def logits(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def test_the_table_names_the_language_model(base):
    model, _ = load_model(base[0])
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    spec = spec_for(model)
    assert (spec.family, spec.blocks, spec.head_path) == (
        "gemma3", f"{LM}layers", (f"{LM}norm",))
    assert len(get_blocks(model, spec)) == 6
    text = language_model(model)
    assert text.model is model.model.language_model and text.lm_head is model.lm_head
    assert text.config.model_type == "gemma3_text"
    assert not any(n.startswith(VISION) for n, _ in text.named_parameters())


@pytest.fixture(scope="module", params=["rtn", "gptq"])
def quantized(request, base, tmp_path_factory):
    """(method, in-memory quantized model, result, native output folder)."""
    path, text = base
    out = tmp_path_factory.mktemp("q") / request.param
    options = {"act_order": False} if request.param == "gptq" else {}
    model, _, res, _ = quantize_job(str(path), shorthand(request.param, "w4g32", **options), out,
                                    Calibration(str(text), samples=8, seq_len=64),
                                    fmt="native", progress=False)
    return request.param, model, res, out


def test_only_the_language_model_is_quantized(base, quantized):
    _, model, res, out = quantized
    ref, _ = load_model(base[0])
    ref_sd, sd = ref.state_dict(), model.state_dict()
    lm_linears = {n for n, m in ref.named_modules()
                  if isinstance(m, nn.Linear) and n.startswith(f"{LM}layers.")}
    assert set(res.weights) == lm_linears and len(lm_linears) == 6 * 7
    for name in lm_linears:  # rounded: the model holds a QLinear there now
        w = model.get_submodule(name).dequantized_weight()
        assert torch.equal(w, res.weights[name].dequantize().to(w.dtype))
        assert not torch.equal(w, ref_sd[f"{name}.weight"])
    # every other tensor, the vision tower and projector above all, is unchanged bit for bit
    rest = [k for k in ref_sd if k.rpartition(".")[0] not in lm_linears]
    assert not [k for k in sd if k.rpartition(".")[0] not in lm_linears and k not in ref_sd]
    assert any(k.startswith(VISION[0]) for k in rest) and any(k.startswith(VISION[1]) for k in rest)
    for k in rest:
        assert torch.equal(sd[k], ref_sd[k]), k
    # and the native folder holds them, unquantized
    desc = json.loads((out / "lowbit.json").read_text())
    assert set(desc["layers"]) == lm_linears


def test_native_folder_reloads_with_the_same_logits(base, quantized):
    _, model, _, out = quantized
    back, _ = load_model(out)
    assert type(back).__name__ == "Gemma3ForConditionalGeneration"
    quantized_names = {n for n, m in back.named_modules() if isinstance(m, QLinear)}
    assert quantized_names == {n for n, m in model.named_modules()
                               if isinstance(m, QLinear) and n.startswith(f"{LM}layers.")}
    ref, _ = load_model(base[0])
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    for k, v in ref_sd.items():
        if k.startswith(VISION):
            assert torch.equal(back_sd[k], v), k
    assert torch.equal(logits(back), logits(model))
    assert (logits(ref) - logits(model)).abs().max() > 1e-3  # quantization did change them


def test_the_quantized_model_still_sees_images(quantized):
    """Text-only calibration leaves a model that still takes images: with an image the native
    folder gives the in-memory model's logits, and the image changes them."""
    _, model, _, out = quantized
    back, _ = load_model(out)
    cfg = model.config
    n_img = cfg.mm_tokens_per_image
    ids = torch.tensor([[5, cfg.boi_token_index, *[cfg.image_token_index] * n_img,
                         cfg.eoi_token_index, 7, 8, 9]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        b = back(input_ids=ids, pixel_values=pixels).logits
        c = model(input_ids=ids, pixel_values=torch.zeros_like(pixels)).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_compressed_tensors_export_loads_in_transformers(base, quantized, tmp_path):
    """The export keeps the vision tower and projector as plain tensors with every vision
    Linear in ``ignore``; transformers loads it as Gemma3ForConditionalGeneration with
    lowbit's logits (text only), and so does lowbit's own reader."""
    method, model, res, out = quantized
    ct = tmp_path / "ct"
    lowbit_cli("export", out, ct, "--format", "compressed-tensors", "--dtype", "fp32")
    qcfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    vision_linears = {n for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and n.startswith(VISION)}
    assert vision_linears and set(qcfg["ignore"]) == vision_linears | {"lm_head"}
    hf = tf.AutoModelForImageTextToText.from_pretrained(ct, dtype=torch.float32)
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    ref, _ = load_model(base[0])
    hf_sd, ref_sd = hf.state_dict(), ref.state_dict()
    for k, v in ref_sd.items():
        if k.startswith(VISION):
            assert torch.equal(hf_sd[k], v), k
    ours = logits(model)
    torch.testing.assert_close(logits(hf), ours, atol=1e-4, rtol=1e-4)
    back, _ = load_model(ct)
    assert torch.equal(logits(back), ours)


def test_gguf_export_writes_the_language_model(quantized, tmp_path):
    """GGUF holds the quantized language model as llama.cpp's gemma3 (the vision tower goes to
    llama.cpp's separate mmproj file, which lowbit does not write: a note says so)."""
    from gguf import GGUFReader

    _, _, _, out = quantized
    r = lowbit_cli("export", out, tmp_path / "q.gguf", "--type", "Q8_0")
    assert "mmproj" in r.err
    reader = GGUFReader(tmp_path / "q.gguf")
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["gemma3.block_count"].contents() == 6
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.5.attn_q.weight"} <= names
    assert all(n.startswith(("blk.", "token_embd.", "output_norm.")) for n in names)
