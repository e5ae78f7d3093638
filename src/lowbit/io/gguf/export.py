"""Write a transformers model as a GGUF file that llama.cpp loads: llama, mistral, qwen2,
qwen3, gemma, gemma2, gemma3 and phi3, and the mixture-of-experts mixtral, qwen2_moe and
qwen3_moe (`lowbit.io.gguf.archs` holds what differs). Of a multimodal Gemma 3 the language
model is written (`lowbit.arch.language_model`); llama.cpp reads the vision tower and projector
from a separate mmproj file, which lowbit does not write. A MoE block's experts are written as
three stacked (experts, out, in) tensors ``ffn_*_exps``, its router as ``ffn_gate_inp`` (F32).

Tensor names are llama.cpp's (`blk.N.attn_q.weight` ...), found by the `gguf` package's name
tables from the model's own parameter names; q/k rows are permuted from the transformers
rotate-half layout into the interleaved pairs of llama.cpp's normal RoPE where the
architecture uses it (llama, mistral); Gemma norms are stored as ``w + 1``. Each weight is
encoded by lowbit's own ggml quantizers (`lowbit.formats.ggml`) with the type the preset gives
it (`lowbit.io.gguf.presets`), weighted by an importance matrix when one is given. The
tokenizer comes from a source GGUF file when there is one, else from the transformers
tokenizer. The model may be a lowbit output folder (GPTQ, W8A8, LLM.int8, FP8 ...): an integer
grid goes into Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks from its own codes and scales where the tensor's
type holds it (`lowbit.io.gguf.lossless`; ``qtype="native"`` picks that type per tensor), and
any other runtime module's dequantized weight is encoded.

The file records ``general.quantized_by = "lowbit"``: ``--overwrite`` replaces only a GGUF file
that says lowbit wrote it (`check_gguf_output`). It is written atomically
(`lowbit.io.atomic`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import checkpoint_name, language_model
from lowbit.errors import LowbitError
from lowbit.formats import ggml
from lowbit.formats.ggml import GGML_TYPES
from lowbit.io.atomic import atomic_output, check_output_file, check_replaceable
from lowbit.io.gguf.archs import GGUFArch, arch_for, arch_kv, dims
from lowbit.io.gguf.lossless import BY_SIZE, carry, native_type, summary
from lowbit.io.gguf.presets import (
    FLOAT_TYPES,
    NATIVE,
    NEEDS_IMATRIX,
    get_preset,
    tensor_types,
    type_nbytes,
)
from lowbit.io.gguf.vocab import KV, hf_tokenizer_kv, source_kv
from lowbit.runtime.experts import LinearExperts, moe_spec, unfuse_experts
from lowbit.runtime.qlinear import QuantModule, online_rotated

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
# types whose llama.cpp quantizer ignores the importance matrix; so do we, so that the files
# match (quantize_q8_0 takes no quant_weights)
IMATRIX_IGNORED = {"Q8_0"}
QUANTIZED_BY = "general.quantized_by"  # "lowbit": the --overwrite rule for GGUF files
OURS = f"a GGUF file whose {QUANTIZED_BY} is lowbit"


def is_lowbit_gguf(path: Path) -> bool:
    """A GGUF file lowbit wrote (its ``general.quantized_by``)."""
    from lowbit.io.gguf.check import check_gguf

    try:
        return check_gguf(path)["strings"].get(QUANTIZED_BY) == "lowbit"
    except LowbitError:
        return False


def check_gguf_output(out: Path, overwrite: bool) -> None:
    """Before any long run: ``out`` can be written as a GGUF file, and an existing file there
    is replaced only with ``overwrite`` and only when lowbit wrote it."""
    if out.is_dir():
        raise LowbitError(f"{out} is a folder; give a file name ending in .gguf")
    check_replaceable(out, overwrite, is_lowbit_gguf, OURS)
    check_output_file(out, "GGUF file")


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
    """The llama.cpp architecture to write, or a one-line error for a model we cannot map."""
    return arch_for(language_model(model)).name


def tensor_namer(model: nn.Module, ga: GGUFArch | None = None) -> Callable[[str], str]:
    """transformers parameter name -> llama.cpp tensor name, from the `gguf` package's tables
    ("model.layers.3.mlp.down_proj.weight" -> "blk.3.ffn_down.weight"); a name llama.cpp's
    architecture has no tensor for is a LowbitError."""
    ga = ga or arch_for(model)
    tmap = gguf.get_tensor_name_map(ga.arch, dims(model.config).n_layer)

    def name(hf_name: str) -> str:
        out = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise LowbitError(f"{hf_name} has no tensor in llama.cpp's {ga.name} architecture")
        return out

    return name


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
    experts: list[nn.Module] | None = None  # stacked experts: each slice's Linear (write back)
    quantized: list[nn.Module] | None = None  # lowbit runtime modules holding the weight


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _params(model: nn.Module):
    """(transformers name, module, parameter name, tensor or None for a runtime module's
    dequantized weight) for every tensor the model computes with, tied ones once."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for mod_name, mod in model.named_modules():
        items: list[tuple[str, torch.Tensor | None]] = list(mod.named_parameters(recurse=False))
        if isinstance(mod, QuantModule):
            items = [("weight", None), *(i for i in items if i[0] != "weight")]
        for pname, p in items:
            if p is not None:
                key = (p.data_ptr(), tuple(p.shape))
                if key in seen:
                    continue
                seen.add(key)
            yield (f"{mod_name}.{pname}" if mod_name else pname), mod, pname, p


def _expert_entries(model: nn.Module, to_gguf) -> tuple[list[_Entry], set[str]]:
    """MoE: each block's experts as three stacked (E, out, in) tensors (``ffn_*_exps``), named
    from the merged checkpoint name (``...mlp.experts.gate_proj.weight``); and the prefixes of
    the per-expert Linears they replace."""
    spec = moe_spec(model)
    if spec is None:
        return [], set()
    unfuse_experts(model)
    out, prefixes = [], set()
    for path, mod in model.named_modules():
        if not isinstance(mod, LinearExperts):
            continue
        prefixes.add(path + ".")
        for proj in spec.moe.proj:
            lins = [getattr(ex, proj) for ex in mod]
            name = to_gguf(checkpoint_name(spec, f"{path}.{proj}.weight"))
            shape = (len(lins), lins[0].out_features, lins[0].in_features)
            get = lambda ls=lins: np.stack([_np(_weight(m)) for m in ls])  # noqa: E731
            quantized = lins if all(isinstance(m, QuantModule) for m in lins) else None
            out.append(_Entry(name, shape, get, experts=lins, quantized=quantized))
    return out, prefixes


# tensors llama.cpp holds as vectors that transformers holds as (1, n) matrices
_VECTORS = ("ffn_gate_inp_shexp.weight",)


def model_entries(model: nn.Module, ga: GGUFArch | None = None) -> list[_Entry]:
    """Every tensor of the GGUF file, in the model's order, read lazily."""
    ga = ga or arch_for(model)
    d = dims(model.config)
    to_gguf = tensor_namer(model, ga)
    heads = {"attn_q": d.n_head, "attn_k": d.n_head_kv} if ga.permute_qk else {}
    out, experts = _expert_entries(model, to_gguf)
    spec = moe_spec(model)
    for hf_name, mod, pname, p in _params(model):
        if any(hf_name.startswith(e) for e in experts):
            continue
        name = to_gguf(hf_name if spec is None else checkpoint_name(spec, hf_name))
        if name.endswith(_VECTORS):
            out.append(_Entry(name, (p.numel(),), lambda t=p: _np(t).reshape(-1)))
            continue
        n_head = heads.get(name.split(".")[-2], 0) if name.startswith("blk.") else 0
        if p is None:  # a lowbit runtime module's weight
            shape: tuple[int, ...] = (mod.out_features, mod.in_features)
            get = lambda m=mod: _np(_weight(m))  # noqa: E731
        else:
            shape = tuple(p.shape)
            if ga.norm_offset and hf_name.endswith("norm.weight"):  # Gemma: w + 1
                get = lambda t=p, o=ga.norm_offset: _np(t) + np.float32(o)  # noqa: E731
            else:
                get = lambda t=p: _np(t)  # noqa: E731
        module = mod if pname == "weight" and len(shape) == 2 else None
        quantized = [mod] if p is None else None
        out.append(_Entry(name, shape, get, module, n_head, quantized=quantized))
    return out


def _encode(t: str, w: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(bytes to write, the values llama.cpp will decode)."""
    if t == "F32":
        w = np.ascontiguousarray(w, dtype=np.float32)
        return w, w
    if t == "F16":
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    rows = w.reshape(-1, w.shape[-1])  # stacked experts: ggml quantizes row by row
    data = ggml.quantize(t, rows, importance)
    return data, ggml.dequantize(t, data, w.shape[-1]).reshape(w.shape)


def _importance(imatrix: Mapping | None, name: str, shape: tuple[int, ...]
                ) -> np.ndarray | None:
    """Per column, or for stacked experts (E, out, in) one row of E x in values (llama.cpp's
    per-expert sums) given to each of an expert's rows."""
    if imatrix is None or name not in imatrix:
        return None
    v = np.asarray(imatrix[name], dtype=np.float32).reshape(-1)
    cols = shape[-1]
    if len(shape) == 3 and v.size == shape[0] * cols:
        return np.repeat(v.reshape(shape[0], 1, cols), shape[1], axis=1).reshape(-1, cols)
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
    type_overrides: Mapping[str, str] | None = None,
) -> dict:
    """Write ``model`` to ``out_path`` as a GGUF of preset ``qtype`` (Q4_K_M, Q8_0, F32 ...), or
    (``native``) with each quantized Linear in the block type that holds its lowbit grid.

    ``imatrix``: llama.cpp tensor name -> per-input-column mean of x^2 (an importance matrix);
    ``source_gguf``: a GGUF file to take the tokenizer and general metadata from;
    ``dequantize_into_model``: afterwards the model holds exactly the weights llama.cpp will
    decode (for evaluating the file with lowbit); ``type_overrides``: a ggml type for some
    weights (module name -> type, e.g. a size-budget allocation), over the preset's rules (the
    result's ``type_overrides`` names them as llama.cpp does). Returns sizes and bits per
    weight, the tensors written from lowbit's codes (``from_codes``), those re-encoded
    (``reencoded``: name -> (type, why)) and a one-line ``note`` on both.
    """
    t0 = time.perf_counter()
    rotated = online_rotated(model)
    if rotated:
        raise LowbitError(f"GGUF: {rotated[0]} (and {len(rotated) - 1} more) are rotated at run "
                          "time (--rotate-online, --incoherence), which llama.cpp's graphs do not; "
                          "quantize with --rotate alone (fused rotations) to export GGUF")
    native = str(qtype).lower() == NATIVE
    preset = None if native else get_preset(qtype)
    model = language_model(model)  # multimodal: the vision tower goes to an mmproj file
    ga = arch_for(model)
    arch = ga.name
    imatrix = getattr(imatrix, "data", imatrix)  # an Imatrix object or a plain mapping
    if preset is not None and preset.name in NEEDS_IMATRIX and not imatrix:
        raise LowbitError(f"{preset.name} needs an importance matrix (--imatrix), as in llama.cpp")
    d = dims(model.config)
    entries = model_entries(model, ga)
    own = {e.name: native_type(e.quantized, e.shape[-1]) for e in entries if e.quantized}
    own = {k: v for k, v in own.items() if v}
    if native:
        if not own:
            raise LowbitError(
                "--type native writes a lowbit model's integer grids as they are; this model "
                "has no quantized weight a llama.cpp block type holds (give a --type such as "
                "Q4_K_M)")
        counts = Counter(own.values())
        ternary = [t for t in BY_SIZE if counts[t] and t.startswith("TQ")]
        preset = get_preset(ternary[0] if ternary else  # (shorter rows fall back to Q4_0)
                            max(BY_SIZE, key=lambda t: (counts[t], -BY_SIZE.index(t))))
    types = tensor_types(
        preset.name,
        {e.name: e.shape for e in entries},
        n_layer=d.n_layer,
        n_gqa=d.n_head // d.n_head_kv,
        has_imatrix=bool(imatrix),
        n_expert=int(getattr(model.config, "num_local_experts", None)
                     or getattr(model.config, "num_experts", None) or 0),
    )
    if native:  # each quantized tensor in its own grid's type, the rest by the preset's rules
        types |= own
    overridden: dict[str, str] = {}  # llama.cpp tensor name -> type, from type_overrides
    if type_overrides:
        to_gguf, shapes = tensor_namer(model, ga), {e.name: e.shape for e in entries}
        for module, t in type_overrides.items():
            name = to_gguf(module + ".weight")
            if name not in shapes or len(shapes[name]) != 2:
                raise LowbitError(f"{module}: no such weight matrix in the GGUF file")
            if t.upper() not in GGML_TYPES or shapes[name][-1] % GGML_TYPES[t.upper()].block_size:
                raise LowbitError(f"{module}: {t} cannot hold rows of {shapes[name][-1]}")
            overridden[name] = t.upper()
        types |= overridden
    kv = arch_kv(model, ga) + _kv(model, tokenizer, arch, source_gguf)
    out_path = Path(out_path)
    with atomic_output(out_path, folder=False) as tmp:
        stats = _write(
            tmp, arch, preset.ftype, kv, entries, types, imatrix, progress, dequantize_into_model
        )
    stats |= {
        "path": str(out_path),
        "qtype": f"native ({preset.name} rules)" if native else preset.name,
        "file_bytes": out_path.stat().st_size,
        "imatrix": bool(imatrix),
        "type_overrides": overridden,
        "seconds": time.perf_counter() - t0,
    }
    return stats


def _write(path, arch, ftype, kv, entries, types, imatrix, progress, write_back) -> dict:
    w = GGUFWriter(path, arch)
    for key, value, vtype, sub in kv:
        if key != QUANTIZED_BY:  # a source GGUF's own: this file is lowbit's
            w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_string(QUANTIZED_BY, "lowbit")
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
    carried: list[str] = []
    reencoded: dict[str, tuple[str, str]] = {}
    for e in tqdm(entries, desc=f"gguf {path.name}", unit="tensor", disable=not progress):
        t = types[e.name]
        data = None
        if e.quantized and t not in FLOAT_TYPES:  # lowbit's codes and scales, if t holds them
            reorder = (lambda a, n=e.n_head: permute_qk(a, n)) if e.n_head else None
            data, why = carry(t, e.quantized, reorder)
            if data is None:
                reencoded[e.name] = (t, why)
            else:
                carried.append(e.name)
                data = data.reshape(-1, data.shape[-1])
                decoded = ggml.dequantize(t, data, e.shape[-1]).reshape(e.shape)
        if data is None:
            x = e.get()
            if e.n_head:
                x = permute_qk(x, e.n_head)
            imp = None
            if (x.ndim >= 2 and t not in ("F32", "F16", *IMATRIX_IGNORED)
                    and e.name.startswith("blk.")):
                imp = _importance(imatrix, e.name, x.shape)
                if imatrix and imp is None and e.name.endswith(".weight"):
                    missing.append(e.name)
            try:
                data, decoded = _encode(t, x, imp)
            except ValueError as err:
                raise LowbitError(f"cannot encode {e.name} as {t}: {err}") from None
        w.write_tensor_data(data)
        if write_back and (e.module is not None or e.experts):
            _write_back(e, decoded)
        row = per_type.setdefault(t, {"tensors": 0, "weights": 0, "bytes": 0})
        row["tensors"] += 1
        row["weights"] += decoded.size
        row["bytes"] += data.nbytes
    w.close()
    for row in per_type.values():
        row["bpw"] = 8 * row["bytes"] / row["weights"]
    return _summary(per_type, entries, types, missing) | {
        "from_codes": carried, "reencoded": reencoded, "note": summary(len(carried), reencoded)}


def _write_back(e: _Entry, decoded: np.ndarray) -> None:
    if e.experts:
        for m, part in zip(e.experts, decoded, strict=True):
            _write_back(_Entry(e.name, part.shape, e.get, m), part)
        return
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
    lin = [e for e in entries if e.name.startswith("blk.") and len(e.shape) in (2, 3)]
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
