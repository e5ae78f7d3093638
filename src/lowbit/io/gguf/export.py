"""Write a transformers model of the llama family as a GGUF file that llama.cpp loads.

Tensors get llama.cpp's names (`blk.N.attn_q.weight` ...), q/k rows are permuted from the
transformers rotate-half layout into the interleaved pairs llama.cpp's RoPE expects, and each
weight is encoded by lowbit's own ggml quantizers (`lowbit.formats.ggml`) with the type the
preset gives it (`lowbit.io.gguf.presets`), weighted by an importance matrix when one is given.
The tokenizer comes from a source GGUF file when there is one, else from the transformers
tokenizer. The model may be a lowbit output folder (GPTQ, W8A8, LLM.int8, FP8 ...): the
dequantized weights of its runtime modules are what gets encoded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import get_blocks, spec_for
from lowbit.errors import LowbitError
from lowbit.formats import ggml
from lowbit.io.gguf.presets import NEEDS_IMATRIX, get_preset, tensor_types, type_nbytes
from lowbit.io.gguf.vocab import KV, hf_tokenizer_kv, source_kv
from lowbit.runtime.qlinear import QuantModule

# lowbit family -> llama.cpp architecture (mistral is written as llama, as llama.cpp's convert does)
GGUF_ARCH = {"llama": "llama", "mistral": "llama"}
# module inside a block -> llama.cpp tensor name
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
# types whose llama.cpp quantizer ignores the importance matrix; so do we, so that the files
# match (quantize_q8_0 takes no quant_weights)
IMATRIX_IGNORED = {"Q8_0"}


def gguf_name(block: int, module: str, param: str = "weight") -> str:
    """llama.cpp's name for a block's module: (3, "mlp.down_proj") -> blk.3.ffn_down.weight."""
    return f"blk.{block}.{BLOCK_NAMES[module]}.{param}"


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers q/k rows (per head: first halves, then second halves of the rotary pairs)
    -> llama.cpp rows (pairs interleaved). Works on weights (rows, cols) and biases (rows,)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise LowbitError(f"cannot split {rows} q/k rows into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(model: nn.Module) -> str:
    """The llama.cpp architecture to write, or a clear error for a family we cannot map."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    try:
        family = spec_for(model).family
    except LowbitError:
        family = None
    if family not in GGUF_ARCH:
        raise LowbitError(
            f"GGUF export does not support model type {mtype!r}; it writes llama.cpp's llama "
            f"architecture, for model families {', '.join(sorted(GGUF_ARCH))}"
        )
    return GGUF_ARCH[family]


@dataclass(frozen=True)
class _Dims:
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    hidden: int


def _dims(cfg) -> _Dims:
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    return _Dims(cfg.num_hidden_layers, n_head, n_kv, head_dim, cfg.hidden_size)


def _rope(cfg) -> tuple[float, dict | None]:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or params
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": float(scaling["factor"])}
    raise LowbitError(f"GGUF export does not support RoPE scaling of type {kind!r}")


def arch_kv(model: nn.Module, arch: str) -> list[KV]:
    """Architecture hyperparameters under `{arch}.*`."""
    cfg = model.config
    d = _dims(cfg)
    theta, scaling = _rope(cfg)
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    kv: list[KV] = [
        (f"{arch}.block_count", d.n_layer, u32, None),
        (f"{arch}.context_length", int(cfg.max_position_embeddings), u32, None),
        (f"{arch}.embedding_length", d.hidden, u32, None),
        (f"{arch}.feed_forward_length", int(cfg.intermediate_size), u32, None),
        (f"{arch}.attention.head_count", d.n_head, u32, None),
        (f"{arch}.attention.head_count_kv", d.n_head_kv, u32, None),
        (f"{arch}.rope.freq_base", theta, f32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps), f32, None),
        (f"{arch}.vocab_size", int(model.get_input_embeddings().num_embeddings), u32, None),
        (f"{arch}.rope.dimension_count", d.head_dim, u32, None),
    ]
    if d.head_dim * d.n_head != d.hidden:
        kv.append((f"{arch}.attention.key_length", d.head_dim, u32, None))
        kv.append((f"{arch}.attention.value_length", d.head_dim, u32, None))
    if scaling:
        kv.append((f"{arch}.rope.scaling.type", scaling["type"], GGUFValueType.STRING, None))
        kv.append((f"{arch}.rope.scaling.factor", scaling["factor"], f32, None))
    return kv


def _weight(module: nn.Module) -> torch.Tensor:
    """A module's weight as the model computes with it: the dequantized weight of any lowbit
    runtime module (QLinear, W8A8Linear, Int8MixedLinear, FP8Linear), else ``weight``."""
    if isinstance(module, QuantModule):
        return module.dequantized_weight()
    return module.weight


@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]
    get: Callable[[], np.ndarray]
    module: nn.Module | None = None  # whose weight the decoded tensor can be written back to
    n_head: int = 0  # q/k: heads for the row permutation


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def model_entries(model: nn.Module) -> list[_Entry]:
    """Every tensor of the GGUF file, in llama.cpp's usual order, read lazily."""
    spec = spec_for(model)
    d = _dims(model.config)
    emb = model.get_input_embeddings()
    out = [_Entry("token_embd.weight", tuple(emb.weight.shape), lambda m=emb: _np(m.weight), emb)]
    for i, block in enumerate(get_blocks(model, spec)):
        for mod_name in BLOCK_NAMES:
            mod = block.get_submodule(mod_name)
            heads = {"self_attn.q_proj": d.n_head, "self_attn.k_proj": d.n_head_kv}.get(mod_name, 0)
            shape = (
                (mod.out_features, mod.in_features)
                if hasattr(mod, "out_features")
                else tuple(mod.weight.shape)
            )
            get = lambda m=mod: _np(_weight(m))  # noqa: E731
            out.append(_Entry(gguf_name(i, mod_name), shape, get, mod, heads))
            bias = getattr(mod, "bias", None)
            if isinstance(bias, torch.Tensor):
                out.append(
                    _Entry(
                        gguf_name(i, mod_name, "bias"),
                        tuple(bias.shape),
                        lambda b=bias: _np(b),
                        None,
                        heads,
                    )
                )
    norm = model.get_submodule("model.norm")
    out.append(_Entry("output_norm.weight", tuple(norm.weight.shape), lambda m=norm: _np(m.weight)))
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
        out.append(
            _Entry("output.weight", tuple(head.weight.shape), lambda m=head: _np(m.weight), head)
        )
    return out


def _encode(t: str, w: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(bytes to write, the values llama.cpp will decode)."""
    if t == "F32":
        w = np.ascontiguousarray(w, dtype=np.float32)
        return w, w
    if t == "F16":
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    data = ggml.quantize(t, w, importance)
    return data, ggml.dequantize(t, data, w.shape[1])


def _importance(imatrix: Mapping | None, name: str, cols: int) -> np.ndarray | None:
    if imatrix is None or name not in imatrix:
        return None
    v = np.asarray(imatrix[name], dtype=np.float32).reshape(-1)
    if v.size != cols:
        raise LowbitError(
            f"imatrix entry {name} has {v.size} values but the tensor has {cols} columns"
        )
    return v


def _kv(model: nn.Module, tokenizer, arch: str, source_gguf: Path | None) -> list[KV]:
    if source_gguf is not None:
        from lowbit.io.gguf.check import open_gguf

        reader = open_gguf(source_gguf)
        src_arch = reader.fields.get("general.architecture")
        if src_arch is None or src_arch.contents() != arch:
            raise LowbitError(f"{source_gguf} is not a {arch} GGUF file")
        kv = source_kv(reader, arch)
        if not any(k == "tokenizer.ggml.tokens" for k, *_ in kv):
            raise LowbitError(f"{source_gguf} holds no tokenizer")
        return kv
    name = str(
        getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", "")
    )
    kv = [("general.name", Path(name).name or "model", GGUFValueType.STRING, None)]
    if tokenizer is None:
        raise LowbitError("GGUF export needs the model's tokenizer (or a source GGUF file)")
    n_vocab = model.get_input_embeddings().num_embeddings
    return kv + hf_tokenizer_kv(tokenizer, n_vocab)


def export_gguf(
    model: nn.Module,
    tokenizer,
    out_path: str | Path,
    qtype: str,
    imatrix: Mapping[str, np.ndarray] | None = None,
    source_gguf: Path | None = None,
    progress: bool = True,
    dequantize_into_model: bool = False,
) -> dict:
    """Write ``model`` to ``out_path`` as a GGUF of preset ``qtype`` (Q4_K_M, Q8_0, F32 ...).

    ``imatrix``: llama.cpp tensor name -> per-input-column mean of x^2 (an importance matrix);
    ``source_gguf``: a GGUF file to take the tokenizer and general metadata from;
    ``dequantize_into_model``: afterwards the model holds exactly the weights llama.cpp will
    decode (for evaluating the file with lowbit). Returns sizes and bits per weight.
    """
    t0 = time.perf_counter()
    preset = get_preset(qtype)
    arch = gguf_arch(model)
    imatrix = getattr(imatrix, "data", imatrix)  # an Imatrix object or a plain mapping
    if preset.name in NEEDS_IMATRIX and not imatrix:
        raise LowbitError(f"{preset.name} needs an importance matrix (--imatrix), as in llama.cpp")
    d = _dims(model.config)
    entries = model_entries(model)
    types = tensor_types(
        preset.name,
        {e.name: e.shape for e in entries},
        n_layer=d.n_layer,
        n_gqa=d.n_head // d.n_head_kv,
        has_imatrix=bool(imatrix),
    )
    kv = arch_kv(model, arch) + _kv(model, tokenizer, arch, source_gguf)
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        stats = _write(
            tmp, arch, preset.ftype, kv, entries, types, imatrix, progress, dequantize_into_model
        )
        os.replace(tmp, out_path)
    except OSError as e:
        raise LowbitError(f"cannot write {out_path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    stats |= {
        "path": str(out_path),
        "qtype": preset.name,
        "file_bytes": out_path.stat().st_size,
        "imatrix": bool(imatrix),
        "seconds": time.perf_counter() - t0,
    }
    return stats


def _write(path, arch, ftype, kv, entries, types, imatrix, progress, write_back) -> dict:
    w = GGUFWriter(path, arch)
    for key, value, vtype, sub in kv:
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_uint32("general.file_type", ftype)
    w.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
    for e in entries:
        t = types[e.name]
        nbytes = type_nbytes(t, int(np.prod(e.shape)))
        if t in ("F32", "F16"):
            w.add_tensor_info(
                e.name, e.shape, np.dtype(np.float32 if t == "F32" else np.float16), nbytes
            )
        else:
            w.add_tensor_info(
                e.name, e.shape, np.dtype(np.float32), nbytes, raw_dtype=GGMLQuantizationType[t]
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    per_type: dict[str, dict] = {}
    missing = []
    for e in tqdm(entries, desc=f"gguf {path.name}", unit="tensor", disable=not progress):
        t = types[e.name]
        x = e.get()
        if e.n_head:
            x = permute_qk(x, e.n_head)
        imp = None
        if x.ndim == 2 and t not in ("F32", "F16", *IMATRIX_IGNORED) and e.name.startswith("blk."):
            imp = _importance(imatrix, e.name, x.shape[1])
            if imatrix and imp is None and e.name.endswith(".weight"):
                missing.append(e.name)
        try:
            data, decoded = _encode(t, x, imp)
        except ValueError as err:
            raise LowbitError(f"cannot encode {e.name} as {t}: {err}") from None
        w.write_tensor_data(data)
        if write_back and e.module is not None:
            _write_back(e, decoded)
        row = per_type.setdefault(t, {"tensors": 0, "weights": 0, "bytes": 0})
        row["tensors"] += 1
        row["weights"] += x.size
        row["bytes"] += data.nbytes
    w.close()
    for row in per_type.values():
        row["bpw"] = 8 * row["bytes"] / row["weights"]
    return _summary(per_type, entries, types, missing)


def _write_back(e: _Entry, decoded: np.ndarray) -> None:
    if not isinstance(getattr(e.module, "weight", None), torch.Tensor):
        raise LowbitError(
            "dequantize_into_model needs a model with plain weights, not a lowbit folder"
        )
    if e.n_head:
        decoded = unpermute_qk(decoded, e.n_head)
    with torch.no_grad():
        tgt = e.module.weight
        tgt.copy_(torch.from_numpy(np.ascontiguousarray(decoded)).to(tgt.dtype).reshape(tgt.shape))


def _summary(per_type: dict, entries: list[_Entry], types: dict, missing: list[str]) -> dict:
    n_all = sum(r["weights"] for r in per_type.values())
    b_all = sum(r["bytes"] for r in per_type.values())
    lin = [e for e in entries if e.name.startswith("blk.") and len(e.shape) == 2]
    n_lin = sum(int(np.prod(e.shape)) for e in lin)
    b_lin = sum(type_nbytes(types[e.name], int(np.prod(e.shape))) for e in lin)
    return {
        "types": per_type,
        "tensor_types": types,
        "weights": n_all,
        "tensor_bytes": b_all,
        "bpw": 8 * b_all / max(n_all, 1),  # over every tensor, as llama.cpp reports BPW
        "bpw_linear": 8 * b_lin / max(n_lin, 1),  # over the blocks' Linear weights
        "imatrix_missing": missing,
    }
