"""lowbit's native format: one safetensors file (``lowbit.safetensors``) with every quantized
layer's stored tensors (``GridWeight.to_tensors`` or a runtime module's ``to_tensors``), the
model's config and tokenizer, and ``lowbit.json`` describing each layer, the recipe and the
calibration. The weights file is deliberately not ``model.safetensors``: transformers refuses
the folder ("no file named model.safetensors") instead of loading the model with every
quantized Linear missing and randomly initialised (it did with version 1).

``lowbit.json`` (format ``lowbit-native``, version 2) records per layer its ``shape`` and either
``grid`` (a scheme name; ``scale_dtype`` for integer grids with fp32 scales) or ``kind`` (an
int8 / FP8 runtime module), plus ``conv1d``; at the top the full ``recipe``. Version 1 folders
(integer layers recorded as a ``scheme`` dict, weights in ``model.safetensors``) load
unchanged: the stored tensors are the same.

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
from safetensors.torch import load_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.grids import grid_info
from lowbit.formats.weight import GridWeight
from lowbit.io.shards import ShardWriter
from lowbit.runtime.experts import unfuse_experts
from lowbit.runtime.modules import build_module

FORMAT = "lowbit-native"
VERSION = 2
READS = (1, 2)  # versions this lowbit loads
WEIGHTS = "lowbit.safetensors"  # v1: model.safetensors
SERVING_RECORDS = ("compressed-tensors", "gptq", "awq")  # lowbit.json of serving checkpoints


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
    qweights: dict,
    meta: dict,
    overwrite: bool = False,
    conv1d: bool = False,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Write a quantized model (``qweights``: ``GridWeight`` or runtime modules, by full module
    name) and its description; ``extra`` files (name -> bytes) go in the same atomic write."""
    out = Path(out)
    seen: dict[int, str] = {}
    tied = {}
    plain = []
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in qweights and leaf != "bias":
            continue  # written from the quantized weight
        if v.data_ptr() in seen and v.numel():
            tied[k] = seen[v.data_ptr()]
            continue
        seen[v.data_ptr()] = k
        plain.append(k)
    desc = {
        "format": FORMAT,
        "version": VERSION,
        "layers": {n: _layer_info(q, conv1d and n != "lm_head") for n, q in qweights.items()},
        "tied": tied,
        **meta,
    }
    with atomic_dir(out, overwrite) as tmp:
        # not model.safetensors: transformers must refuse the folder ("no file named
        # model.safetensors"), not load it with every quantized Linear randomly initialised
        # tensors are written as they are made: the whole output is never in memory at once
        with ShardWriter(tmp, WEIGHTS.removesuffix(".safetensors"),
                         metadata={"format": FORMAT}) as shards:
            for name, qw in qweights.items():
                for k, v in qw.to_tensors().items():
                    shards.add(f"{name}.{k}", v)
            state = model.state_dict()
            for k in plain:
                shards.add(k, state[k])
        cfg = model.config
        cfg.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "lowbit.json").write_text(json.dumps(desc, indent=1))
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
    return out


def _layer_info(q, conv1d: bool) -> dict:
    if isinstance(q, GridWeight):
        return {"shape": list(q.shape), **grid_info(q.grid), "conv1d": conv1d}
    return {**q.layer_info(), "conv1d": conv1d}  # runtime modules (W8A8, LLM.int8, FP8)


def read_description(path: Path) -> dict:
    """The ``lowbit.json`` of a folder lowbit wrote: a native folder (checked: version), or a
    serving checkpoint, which records the same description under its format's name."""
    try:
        desc = json.loads((Path(path) / "lowbit.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{path}: unreadable lowbit.json ({e})") from None
    if desc.get("format") in SERVING_RECORDS:
        return desc
    if desc.get("format") != FORMAT:
        raise LowbitError(f"{path}: not a {FORMAT} folder")
    if desc.get("version") not in READS:
        raise LowbitError(f"{path}: {FORMAT} version {desc.get('version')!r}; this lowbit reads "
                          f"versions {', '.join(map(str, READS))} (a newer lowbit wrote it?)")
    return desc


def is_native(path: Path) -> bool:
    """A lowbit native folder (loaded by ``load_quantized``; a serving checkpoint with a
    ``lowbit.json`` loads through its format)."""
    return (Path(path) / "lowbit.json").is_file() and \
        read_description(path).get("format") == FORMAT


def serving_record(fmt: str, weights: dict, meta: dict) -> bytes:
    """``lowbit.json`` for a serving checkpoint: the description (recipe, calibration, base
    model, measured figures) and each quantized layer's grid, under the checkpoint's format."""
    keep = {k: v for k, v in meta.items() if k not in ("format", "version", "layers", "tied")}
    layers = {n: _layer_info(q, False) for n, q in weights.items()}
    return json.dumps({"format": fmt, "layers": layers, **keep}, indent=1, default=str).encode()


def load_quantized(path: Path, cache_weights: bool = False) -> tuple[nn.Module, object]:
    """Rebuild the model with runtime modules (``QLinear`` ...) holding the stored weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    desc = read_description(path)
    tensors = load_file(str(path / (WEIGHTS if desc["version"] >= 2 else "model.safetensors")))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    unfuse_experts(model)  # MoE: experts saved one Linear each
    qbuf = set()
    for name, info in desc["layers"].items():
        parts = {
            k.rsplit(".", 1)[1]: tensors.pop(k)
            for k in list(tensors)
            if k.rsplit(".", 1)[0] == name and k.rsplit(".", 1)[1] != "bias"
        }
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = tensors.get(f"{name}.bias")
        try:
            module = build_module(info, parts, bias, cache_weights)
        except LowbitError as e:
            raise LowbitError(f"{path}: {name}: {e}") from None
        setattr(parent, child, module)
        qbuf |= {f"{name}.{b}" for b, _ in module.named_buffers(recurse=False)}
    return finish_load(model, path, tensors, qbuf | set(desc.get("tied", {})),
                       bool(desc.get("tied")))


def finish_load(model: nn.Module, path: Path, tensors: dict[str, torch.Tensor],
                expected_missing: set[str], tie: bool) -> tuple[nn.Module, object]:
    """Load the remaining tensors into a model whose quantized modules are in place, check that
    nothing else is missing or left over, tie the embeddings if asked; (model, tokenizer)."""
    from transformers import AutoTokenizer

    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in expected_missing]
    if missing or unexpected:
        raise LowbitError(f"{path}: tensors do not match the model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    if tie:
        model.tie_weights()
    model.eval()
    tok = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok
