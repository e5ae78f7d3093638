"""lowbit's native format: one safetensors file with packed codes, scales, zeros and g_idx,
the model's config and tokenizer, and ``lowbit.json`` describing scheme and recipe.

Per layer lowbit.json records the shape and either ``scheme`` (an integer ``Scheme``; tensors
``qweight``, ``scales``, ``zeros``, ``g_idx``) or ``grid`` (a ``WeightGrid`` name and the codes'
``code_dtype``; tensors as ``GridWeight.to_tensors`` lists them).

Writing is atomic: everything goes to a temporary folder beside the target, renamed into
place at the end; an existing output is replaced only when asked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.gridweight import GridWeight
from lowbit.qweight import QuantizedWeight
from lowbit.runtime.qlinear import GridLinear, QuantLinear
from lowbit.scheme import Scheme

FORMAT = "lowbit-native"
VERSION = 1


def check_writable(out: Path, overwrite: bool) -> None:
    """Fail early (before any long run) when the output cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"{out} exists; pass --overwrite to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LowbitError(f"cannot create {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise LowbitError(f"cannot write to {parent}")


@contextmanager
def atomic_dir(out: Path, overwrite: bool):
    """Yield a temporary folder; on success it replaces ``out`` in one rename."""
    out = Path(out)
    check_writable(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_quantized(
    out: Path,
    model: nn.Module,
    tokenizer,
    qweights: dict[str, QuantizedWeight | GridWeight],
    meta: dict,
    overwrite: bool = False,
    conv1d: bool = False,
) -> Path:
    """Write a quantized model (``qweights`` by full module name) and its description."""
    out = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in qweights.items():
        for k, v in qw.to_tensors().items():
            tensors[f"{name}.{k}"] = v.contiguous()
    skip = {f"{n}.weight" for n in qweights}
    seen: dict[int, str] = {}
    tied = {}
    for k, v in model.state_dict().items():
        if k in skip:
            continue
        if v.data_ptr() in seen and v.numel():
            tied[k] = seen[v.data_ptr()]
            continue
        seen[v.data_ptr()] = k
        tensors[k] = v.detach().contiguous()
    desc = {
        "format": FORMAT,
        "version": VERSION,
        "layers": {n: _layer_info(q, conv1d) for n, q in qweights.items()},
        "tied": tied,
        **meta,
    }
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        cfg = model.config
        cfg.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "lowbit.json").write_text(json.dumps(desc, indent=1))
    return out


def _layer_info(q: QuantizedWeight | GridWeight, conv1d: bool) -> dict:
    if hasattr(q, "layer_info"):  # int8 runtime modules (W8A8, LLM.int8): a ``kind``
        return {**q.layer_info(), "conv1d": conv1d}
    if isinstance(q, GridWeight):
        return {"shape": list(q.shape), **q.describe(), "conv1d": conv1d}
    return {"shape": list(q.shape), "scheme": q.scheme.to_dict(), "conv1d": conv1d}


def _layer_module(info: dict, parts: dict[str, torch.Tensor], bias, cache: bool) -> nn.Module:
    shape = tuple(info["shape"])
    if "kind" in info:
        from lowbit.runtime.int8_modules import int8_module

        return int8_module(info, parts, bias)
    if "grid" in info:
        gw = GridWeight.from_tensors(info["grid"], shape, parts, info.get("code_dtype", "uint8"))
        return GridLinear(gw, bias, cache=cache)
    qw = QuantizedWeight.from_tensors(Scheme.from_dict(info["scheme"]), shape, parts)
    return QuantLinear(qw, bias, cache=cache)


def read_description(path: Path) -> dict:
    try:
        desc = json.loads((Path(path) / "lowbit.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{path}: unreadable lowbit.json ({e})") from None
    if desc.get("format") != FORMAT:
        raise LowbitError(f"{path}: not a {FORMAT} folder")
    return desc


def load_quantized(path: Path, cache_weights: bool = False) -> tuple[nn.Module, object]:
    """Rebuild the model with QuantLinear / GridLinear modules holding the packed weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    desc = read_description(path)
    tensors = load_file(str(path / "model.safetensors"))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    qbuf = set()
    for name, info in desc["layers"].items():
        int_keys = ("qweight", "scales", "zeros", "g_idx")
        parts = {
            k.rsplit(".", 1)[1]: tensors.pop(k)
            for k in list(tensors)
            if k.rsplit(".", 1)[0] == name
            and (("grid" in info or "kind" in info) and k.rsplit(".", 1)[1] != "bias"
                 or k.rsplit(".", 1)[1] in int_keys)
        }
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        bias = tensors.get(f"{name}.bias")
        module = _layer_module(info, parts, bias, cache_weights)
        setattr(parent, child, module)
        qbuf |= {f"{name}.{b}" for b, _ in module.named_buffers(recurse=False)}
        qbuf |= {f"{name}.{b}" for b in int_keys}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in desc.get("tied", {})]
    missing = [k for k in missing if k not in qbuf]
    if missing or unexpected:
        raise LowbitError(
            f"{path}: tensors do not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    if desc.get("tied"):
        model.tie_weights()
    model.eval()
    tok = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok
