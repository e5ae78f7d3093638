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

Writing is atomic (``lowbit.io.atomic``): everything goes to a temporary folder beside the
target, renamed into place at the end; an existing output is replaced only when asked and only
when lowbit wrote it (a folder with a ``lowbit.json`` of one of lowbit's formats).

Integrity: ``lowbit.json`` records the size and sha256 of every other file of the folder
(``files``), written last; loading checks them all before reading a tensor (sha256 reads
~700 MB/s here: 0.15 s for a 100 MB output), so a flipped byte, a truncated or a replaced file
is refused, naming it. The description itself is checked (a JSON object, a known format and
version, each layer's shape and grid or kind), and each layer's stored tensors must have the
sizes its grid and shape give (``GridWeight.from_tensors``): a bit width or group size edited
in lowbit.json is refused, never decoded into garbage.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.grids import grid_info
from lowbit.formats.weight import GridWeight
from lowbit.io import atomic
from lowbit.io.shards import ShardWriter
from lowbit.runtime.experts import unfuse_experts
from lowbit.runtime.modules import build_module

FORMAT = "lowbit-native"
VERSION = 2
READS = (1, 2)  # versions this lowbit loads
WEIGHTS = "lowbit.safetensors"  # v1: model.safetensors
SERVING_RECORDS = ("compressed-tensors", "gptq", "awq")  # lowbit.json of serving checkpoints
HASH_CHUNK = 8 << 20


OURS = "a folder with a lowbit.json"  # the --overwrite rule, for messages


def is_lowbit_folder(path: Path) -> bool:
    """A folder lowbit wrote: its lowbit.json is a description of one of lowbit's formats."""
    try:
        desc = json.loads((Path(path) / "lowbit.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(desc, dict) and desc.get("format") in (FORMAT, *SERVING_RECORDS)


def check_writable(out: Path, overwrite: bool) -> None:
    """Fail early (before any long run) when the output folder cannot be written; an existing
    one is replaced only with ``overwrite`` and only when lowbit wrote it (``OURS``)."""
    atomic.check_writable(Path(out), overwrite, is_lowbit_folder, OURS)


@contextmanager
def atomic_dir(out: Path, overwrite: bool):
    """Yield a temporary folder; on success it replaces ``out`` in one rename
    (``lowbit.io.atomic``)."""
    check_writable(out, overwrite)
    with atomic.atomic_output(Path(out), folder=True) as tmp:
        yield tmp


# ---------------------------------------------------------------- integrity


def file_records(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file of a folder but its lowbit.json, by name."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name != "lowbit.json" and not p.name.startswith(".")}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def seal(folder: Path, desc: dict) -> None:
    """Write ``lowbit.json``: ``desc`` with the size and sha256 of every other file (``files``)
    and the sha256 of its own contents (``sha256``), both checked when the folder loads."""
    record = json.loads(json.dumps(desc | {"files": file_records(folder)}, default=str))
    record["sha256"] = _record_digest(record)
    (Path(folder) / "lowbit.json").write_text(json.dumps(record, indent=1))


def _record_digest(record: dict) -> str:
    """sha256 of a description without its own ``sha256``, keys sorted: an edit of any value
    (a layer's grid name from nf4 to fp4 keeps every stored size) is seen."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_files(path: Path, desc: dict) -> None:
    """Every file lowbit.json records is there with its size and sha256 (folders written before
    lowbit recorded them have no ``files``: nothing to check)."""
    files = desc.get("files") or {}
    if not isinstance(files, dict):
        raise LowbitError(f"{path}: lowbit.json: 'files' is not an object")
    for name, rec in files.items():
        f = Path(path) / name
        try:
            size = f.stat().st_size
        except OSError as e:
            raise LowbitError(f"{f}: {e.strerror} (lowbit.json records it)") from None
        if size != rec.get("bytes"):
            raise LowbitError(f"{f}: {size} bytes, lowbit.json records {rec.get('bytes')} "
                              "(truncated or replaced)")
        if sha256_file(f) != rec.get("sha256"):
            raise LowbitError(f"{f}: damaged, its sha256 differs from the one lowbit.json "
                              "records")


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
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
        seal(tmp, desc)
    return out


def _layer_info(q, conv1d: bool) -> dict:
    if isinstance(q, GridWeight):
        return {"shape": list(q.shape), **grid_info(q.grid), "conv1d": conv1d}
    return {**q.layer_info(), "conv1d": conv1d}  # runtime modules (W8A8, LLM.int8, FP8)


def read_description(path: Path) -> dict:
    """The ``lowbit.json`` of a folder lowbit wrote: a native folder, or a serving checkpoint,
    which records the same description under its format's name; checked: a JSON object of a
    known format and version, each layer recorded with its shape and grid or kind."""
    f = Path(path) / "lowbit.json"
    try:
        desc = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else e
        raise LowbitError(f"{f}: unreadable ({why})") from None
    if not isinstance(desc, dict):
        raise LowbitError(f"{f}: not a JSON object")
    fmt = desc.get("format")
    if fmt not in (FORMAT, *SERVING_RECORDS):
        raise LowbitError(f"{path}: not a {FORMAT} folder (lowbit.json format {fmt!r})")
    version = desc.get("version", None if fmt in SERVING_RECORDS else "missing")
    if version is not None and version not in READS:
        raise LowbitError(f"{f}: {fmt} version {version!r}; this lowbit reads versions "
                          f"{', '.join(map(str, READS))} (a newer lowbit wrote it?)")
    if "sha256" in desc and desc["sha256"] != _record_digest(desc):  # older folders: none
        raise LowbitError(f"{f}: edited or damaged (its contents differ from the sha256 it "
                          "records)")
    _check_layers(f, desc.get("layers", None if fmt in SERVING_RECORDS else "missing"))
    return desc


def _check_layers(f: Path, layers) -> None:
    if layers is None:
        return
    if not isinstance(layers, dict):
        raise LowbitError(f"{f}: 'layers' is missing or not an object")
    for name, info in layers.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and
                all(isinstance(n, int) and n > 0 for n in shape)):
            raise LowbitError(f"{f}: layer {name} has no valid 'shape'")
        if not any(k in info for k in ("grid", "kind", "scheme")):
            raise LowbitError(f"{f}: layer {name} records no 'grid' or 'kind'")


def is_native(path: Path) -> bool:
    """A lowbit native folder (loaded by ``load_quantized``; a serving checkpoint with a
    ``lowbit.json`` loads through its format)."""
    return (Path(path) / "lowbit.json").is_file() and \
        read_description(path).get("format") == FORMAT


def serving_record(fmt: str, weights: dict, meta: dict) -> dict:
    """``lowbit.json`` for a serving checkpoint: the description (recipe, calibration, base
    model, measured figures) and each quantized layer's grid, under the checkpoint's format."""
    keep = {k: v for k, v in meta.items()
            if k not in ("format", "version", "layers", "tied", "files")}
    layers = {n: _layer_info(q, False) for n, q in weights.items()}
    return {"format": fmt, "version": VERSION, "layers": layers, **keep}


def load_quantized(path: Path, cache_weights: bool = False) -> tuple[nn.Module, object]:
    """Rebuild the model with runtime modules (``QLinear`` ...) holding the stored weights."""
    from transformers import AutoConfig

    path = Path(path)
    desc = read_description(path)
    check_files(path, desc)
    tensors = read_safetensors(path / (WEIGHTS if desc["version"] >= 2 else "model.safetensors"))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = empty_model(config)
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
    model, tok = finish_load(model, path, tensors, qbuf | set(desc.get("tied", {})),
                             bool(desc.get("tied")))
    model.kv_cache_record = desc.get("kv_cache")  # the KV-cache format the recipe chose
    return model, tok


def empty_model(config) -> nn.Module:
    """The model of ``config`` with its parameters on the meta device (no memory: an 8B model
    in fp32 would take 32 GB before any tensor is read); buffers (RoPE tables) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing or damaged file is a LowbitError naming
    it."""
    try:
        return load_file(str(path))
    except OSError as e:
        raise LowbitError(f"{path}: {e.strerror or e}") from None
    except SafetensorError as e:
        raise LowbitError(f"{path}: damaged safetensors file ({e})") from None


def finish_load(model: nn.Module, path: Path, tensors: dict[str, torch.Tensor],
                expected_missing: set[str], tie: bool) -> tuple[nn.Module, object]:
    """Load the remaining tensors into a model whose quantized modules are in place, check that
    nothing else is missing or left over, tie the embeddings if asked; (model, tokenizer)."""
    from transformers import AutoTokenizer

    # the model's own parameters are on the meta device (``empty_model``): the tensors read
    # become them (fp32, as quantized folders load), nothing is allocated twice
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k not in expected_missing]
    if missing or unexpected:
        raise LowbitError(f"{path}: tensors do not match the model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    if tie:
        model.tie_weights()
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise LowbitError(f"{path}: tensors do not match the model (missing {empty[:5]})")
    model.eval()
    tok = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok
