"""GGUF file types ("presets") and the ggml type each tensor gets, following llama.cpp.

The rules restate `llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp` (no Falcon,
no 70B special case, and not its extra bits for models of exactly 8 experts; MoE routers
stay F32, stacked expert tensors ``ffn_*_exps`` count as their ``ffn_*`` category): a preset
has a base type; the output matrix (or the token embedding when it is tied to the output)
is raised to Q6_K; `attn_v` and `ffn_down` get more bits in some layers of the
`_M`/`_S`/`_L` mixes (the ternary TQ1_0/TQ2_0 files keep untied token embeddings at Q4_K);
`attn_output` too in the Q2_K/Q3_K mixes. A row length that the chosen type's block does
not divide falls back to a 32-block type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL, TQ1_0/TQ2_0 -> Q4_0), and to F16 when 32 does not
divide it either. docs/GGUF.md has the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.formats.ggml import GGML_TYPES


@dataclass(frozen=True)
class Preset:
    name: str
    ftype: int  # llama_ftype, written as general.file_type
    base: str  # ggml type of the ordinary weight matrices


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("F32", 0, "F32"),
        Preset("F16", 1, "F16"),
        Preset("Q4_0", 2, "Q4_0"),
        Preset("Q4_1", 3, "Q4_1"),
        Preset("Q8_0", 7, "Q8_0"),
        Preset("Q5_0", 8, "Q5_0"),
        Preset("Q5_1", 9, "Q5_1"),
        Preset("Q2_K", 10, "Q2_K"),
        Preset("Q3_K_S", 11, "Q3_K"),
        Preset("Q3_K_M", 12, "Q3_K"),
        Preset("Q3_K_L", 13, "Q3_K"),
        Preset("Q4_K_S", 14, "Q4_K"),
        Preset("Q4_K_M", 15, "Q4_K"),
        Preset("Q5_K_S", 16, "Q5_K"),
        Preset("Q5_K_M", 17, "Q5_K"),
        Preset("Q6_K", 18, "Q6_K"),
        Preset("Q2_K_S", 21, "Q2_K"),
        Preset("IQ4_NL", 25, "IQ4_NL"),
        Preset("IQ4_XS", 30, "IQ4_XS"),
        Preset("TQ1_0", 36, "TQ1_0"),
        Preset("TQ2_0", 37, "TQ2_0"),
    )
}

FLOAT_TYPES = {"F32": (1, 4), "F16": (1, 2)}  # name -> (block size, bytes per block)
_FALLBACK = {
    "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
}
# `--type native`: each quantized tensor in the block type its lowbit grid is (io/gguf/lossless.py)
NATIVE = "native"
# presets whose Q2_K tensors llama.cpp refuses to make without an importance matrix
NEEDS_IMATRIX = {"Q2_K_S"}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive), or a LowbitError listing the known ones."""
    p = PRESETS.get(str(name).upper())
    if p is None:
        raise LowbitError(
            f"unknown GGUF type {name!r}; known types: {', '.join(PRESETS)}, {NATIVE}")
    return p


def block_size(ggml_type: str) -> int:
    if ggml_type in FLOAT_TYPES:
        return FLOAT_TYPES[ggml_type][0]
    return GGML_TYPES[ggml_type].block_size


def type_nbytes(ggml_type: str, n_elements: int) -> int:
    """Bytes that ``n_elements`` weights take in ``ggml_type``."""
    if ggml_type in FLOAT_TYPES:
        return n_elements * FLOAT_TYPES[ggml_type][1]
    t = GGML_TYPES[ggml_type]
    return n_elements // t.block_size * t.type_size


def category(name: str) -> str:
    """llama.cpp's tensor category for the mixing rules (`tensor_get_category`)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),  # llama.cpp treats fused qkv like attn_v
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def quantizable(name: str, ndim: int) -> bool:
    """Whether llama.cpp quantizes this tensor at all (2-D weights that are not norms nor MoE
    routers)."""
    return (ndim >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pattern for the extra-bits layers of the _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _output_type(base: str, cols: int) -> str:
    if cols % block_size(base):
        return "Q8_0"
    return base if base == "Q8_0" else "Q6_K"


def _attn_v(p: str, t: str, i: int, n: int, n_gqa: int) -> str:
    if p == "Q2_K":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if p == "Q2_K_S" and n_gqa >= 4:
        return "Q4_K"
    if p == "Q3_K_M":
        return "Q5_K" if i < 2 else "Q4_K"
    if p == "Q3_K_L":
        return "Q5_K"
    if p in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
        return "Q5_K"
    if p in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return "Q6_K"
    if p == "Q4_K_S" and i < 4:
        return "Q5_K"
    return t


def _ffn_down(p: str, t: str, i: int, n: int, has_imatrix: bool) -> str:
    if p == "Q2_K":
        return "Q3_K"
    if p == "Q2_K_S":
        return "Q4_K" if i < n // 8 else t
    if p == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if p == "Q3_K_L":
        return "Q5_K"
    if p == "Q4_K_M":
        return "Q6_K" if use_more_bits(i, n) else t
    if p in ("IQ4_NL", "IQ4_XS"):
        return "Q5_K" if i < n // 8 and not has_imatrix else t
    if p == "Q5_K_M":
        return "Q6_K" if use_more_bits(i, n) else t
    if p == "Q4_K_S":
        return "Q5_K" if i < n // 8 else t
    if p in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        return "Q4_1" if p == "Q4_0" else "Q5_1"
    return t


def _attn_output(p: str, t: str) -> str:
    return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(p, t)


def fallback(t: str, cols: int) -> str:
    """A type whose block divides ``cols`` (`tensor_type_fallback`)."""
    if cols % block_size(t) == 0:
        return t
    t2 = _FALLBACK.get(t, t)
    return t2 if cols % block_size(t2) == 0 else "F16"


def _layer_order(name: str) -> tuple[int, str]:
    """llama.cpp visits tensors sorted by block number, then by name (`weight_name_comparer`)."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def tensor_types(
    preset: str,
    tensors: dict[str, tuple[int, ...]],
    n_layer: int,
    n_gqa: int = 1,
    has_imatrix: bool = False,
    n_expert: int = 0,
) -> dict[str, str]:
    """ggml type for each tensor. ``tensors`` maps GGUF names to numpy shapes (rows, cols);
    1-D tensors and norms stay F32. With experts (``n_expert`` > 1) llama.cpp places every
    ``ffn_down`` tensor (stacked experts, shared expert) by its block number (``layer_info``)."""
    p = get_preset(preset)
    tied = "output.weight" not in tensors
    n_attn_v = sum(category(n) == "attn_v" for n in tensors)
    i_attn_v = i_ffn_down = 0
    out: dict[str, str] = {}
    for name in sorted(tensors, key=_layer_order):
        shape = tensors[name]
        if not quantizable(name, len(shape)):
            out[name] = "F32"
            continue
        t = p.base
        cols = shape[-1]
        if t not in FLOAT_TYPES:
            cat = category(name)
            if cat == "output" or (tied and cat == "token_embd"):
                t = _output_type(t, cols)
            elif cat == "token_embd" and t in ("TQ1_0", "TQ2_0"):
                t = "Q4_K"  # llama.cpp's untied embeddings of a ternary model
            elif cat == "attn_v":
                t = _attn_v(p.name, t, i_attn_v, n_attn_v, n_gqa)
                i_attn_v += 1
            elif cat == "ffn_down":
                if n_expert > 1:
                    t = _ffn_down(p.name, t, _layer_order(name)[0], n_layer, has_imatrix)
                else:
                    t = _ffn_down(p.name, t, i_ffn_down, n_layer, has_imatrix)
                i_ffn_down += 1
            elif cat == "attn_output":
                t = _attn_output(p.name, t)
            t = fallback(t, cols)
        out[name] = t
    return out
