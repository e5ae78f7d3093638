"""Serving checkpoints (compressed-tensors, GPTQ, AWQ layouts) written from lowbit's quantized
weights, and read back into lowbit.

A checkpoint is a transformers folder: safetensors shard(s) (``model.safetensors``, or
``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` above the shard
size), ``config.json`` with the format's ``quantization_config``, the tokenizer files and a
model card (``README.md``). Quantized Linears hold the format's tensors; every other tensor
(embeddings, norms, lm_head) is stored in ``dtype``. Writing is atomic
(``lowbit.io.native.atomic_dir``); ``lowbit.json`` records lowbit's description and the size and
sha256 of every other file, checked when the checkpoint loads.

Every format is a ``ServingFormat`` (``lowbit.io.serving.base``) registered in ``FORMATS``;
writing and reading go through that protocol only.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lowbit.arch import checkpoint_name, get_blocks, has_module, spec_for, spec_for_type
from lowbit.errors import LowbitError
from lowbit.formats.weight import GridWeight
from lowbit.io.native import (
    atomic_dir,
    check_files,
    empty_model,
    finish_load,
    read_description,
    read_safetensors,
    seal,
    serving_record,
)
from lowbit.io.serving import awq, compressed_tensors, gptq
from lowbit.io.serving.base import ServingFormat, scheme_name, scheme_of
from lowbit.io.serving.ct_kv import kv_cache_scheme, kv_tensors, read_kv
from lowbit.io.shards import ShardWriter
from lowbit.runtime.experts import moe_spec, unfuse_experts
from lowbit.runtime.qlinear import QLinear, online_rotated

# each format is a module implementing the protocol
FORMATS: dict[str, ServingFormat] = {f.name: f for f in (compressed_tensors, gptq, awq)}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_SHARD_BYTES = 4 * 2**30


def get_format(fmt: str) -> ServingFormat:
    if fmt not in FORMATS:
        raise LowbitError(f"unknown export format {fmt!r}; known: gguf, {', '.join(FORMATS)}")
    return FORMATS[fmt]


def quantized_weights(model: nn.Module) -> dict:
    """The quantized weights of a model loaded from a lowbit folder or a serving checkpoint, by
    full module name: the GridWeight of each QLinear, W8A8Linear modules themselves."""
    from lowbit.runtime.fp8 import FP8Linear
    from lowbit.runtime.int8_mixed import Int8MixedLinear
    from lowbit.runtime.w8a8 import W8A8Linear

    out: dict = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            out[name] = mod.grid_weight()
        elif isinstance(mod, W8A8Linear | FP8Linear):
            out[name] = mod
        elif isinstance(mod, Int8MixedLinear):
            raise LowbitError(
                f"{name}: LLM.int8() layers (mixed int8/fp decomposition at run time) have no "
                "compressed-tensors/GPTQ/AWQ layout; vLLM does not serve them"
            )
    return out


def fused_mismatch(model: nn.Module, schemes: dict[str, str]) -> str | None:
    """The first set of Linears that read one input (q/k/v, gate/up) whose ``schemes`` (by full
    module name) differ, named; None when every set agrees. vLLM and SGLang fuse each such set
    into one matrix (``qkv_proj``, ``gate_up_proj``) of one scheme."""
    from lowbit.arch import block_groups

    try:
        spec = spec_for(model)
        blocks = [(i, b, block_groups(b, spec)) for i, b in enumerate(get_blocks(model, spec))]
    except LowbitError:
        return None  # a family lowbit has no block table for: nothing to check against
    for i, _, groups in blocks:
        for group in groups:
            names = [f"{spec.blocks}.{i}.{m}" for m in group]
            got = {schemes[n] for n in names if n in schemes}
            if len(got) > 1:
                return f"{', '.join(names)} have {' / '.join(sorted(got))}"
    return None


def check_weights(fmt: str, weights: dict, model: nn.Module | None = None) -> None:
    """Every weight fits the format; one scheme for all of them unless the format holds
    several, and then one scheme per set of Linears that serving engines fuse."""
    f = get_format(fmt)
    schemes = {}
    for name, w in weights.items():
        f.check(name, w)
        schemes[name] = scheme_name(scheme_of(w))
    if not weights:
        raise LowbitError("the model has no quantized Linears to export")
    if len(set(schemes.values())) > 1:
        if not f.mixed:
            raise LowbitError(f"{fmt} export takes one scheme for all Linears, not "
                              f"{len(set(schemes.values()))} (compressed-tensors holds several)")
        bad = None if model is None else fused_mismatch(model, schemes)
        if bad:
            raise LowbitError(f"{fmt}: vLLM fuses Linears that read one input into one matrix "
                              f"of one scheme, and {bad}")


def _plain_tensors(model: nn.Module, qnames: set[str], dtype: torch.dtype):
    """Every tensor that is not part of a quantized Linear (biases stay), tied copies once,
    one at a time (a conversion to ``dtype`` is a copy)."""
    seen = set()
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in qnames and leaf != "bias":
            continue
        if v.numel() and v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        yield k, v.detach().to(dtype if v.is_floating_point() else v.dtype)


def round_unquantized(model: nn.Module, qnames: set[str], dtype: str) -> None:
    """Round the tensors a checkpoint stores unquantized, in place, through its ``dtype``: the
    model in memory then computes what the written checkpoint will (``quantize --eval``
    measures the artifact, not an fp32 model that was never saved)."""
    want = DTYPES[dtype]
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if (owner in qnames and leaf != "bias") or not v.is_floating_point():
            continue
        if v.dtype != want and torch.finfo(v.dtype).bits > torch.finfo(want).bits:
            v.copy_(v.to(want))


def _unquantized_linears(model: nn.Module, qnames: set[str]) -> list[str]:
    """Unquantized Linears, and MoE routers (plain modules in transformers 5: vLLM and
    llm-compressor list them as ignored Linears)."""
    out = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in qnames]
    spec = moe_spec(model)
    if spec is not None:
        for i, block in enumerate(get_blocks(model, spec)):
            name = f"{spec.blocks}.{i}.{spec.moe.router}"
            if name not in out and has_module(block, spec.moe.router):
                out.append(name)
    return out


def _on_disk(model: nn.Module):
    """Tensor or module names as the family's checkpoints spell them (Mixtral:
    block_sparse_moe)."""
    spec = moe_spec(model)
    return (lambda n: n) if spec is None else (lambda n: checkpoint_name(spec, n))


def write_checkpoint(
    out: Path,
    fmt: str,
    model: nn.Module,
    tokenizer,
    weights: dict,
    meta: dict,
    overwrite: bool = False,
    dtype: str = "float16",
    max_shard_bytes: int = MAX_SHARD_BYTES,
    fail_after_tensors: bool = False,
    extra: dict[str, bytes] | None = None,
) -> dict:
    """Write ``model`` with ``weights`` (GridWeight or W8A8Linear, by full module name) as a
    ``fmt`` checkpoint.

    ``meta``: lowbit's description (method, recipe, calibration, measured ppl ...) for the
    model card; ``extra``: more files (name -> bytes) written in the same atomic folder.
    ``fail_after_tensors`` simulates a crash mid-write (tests)."""
    from lowbit.io.serving.model_card import model_card

    f = get_format(fmt)
    if dtype not in DTYPES:
        raise LowbitError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    check_weights(fmt, weights, model)
    rotated = online_rotated(model)
    if rotated:
        raise LowbitError(
            f"{fmt}: {rotated[0]} (and {len(rotated) - 1} more) are rotated at run time "
            "(--rotate-online, --incoherence). transformers does not apply compressed-tensors' "
            "transform_config when it loads a checkpoint, so the file would not compute this "
            "model; save it natively, or quantize with --rotate alone (fused rotations)")
    counts = Counter(scheme_name(scheme_of(w)) for w in weights.values())
    scheme = next(scheme_of(w) for w in weights.values()
                  if scheme_name(scheme_of(w)) == counts.most_common(1)[0][0])
    qnames = set(weights)
    disk = _on_disk(model)
    qcfg = f.quantization_config({disk(n): w for n, w in weights.items()},
                                 [disk(n) for n in _unquantized_linears(model, qnames)])
    kv = kv_cache_scheme(meta.get("kv_cache")) if f.name == "compressed-tensors" else None
    if kv is not None:
        qcfg["kv_cache_scheme"] = kv
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    cfg.pop("_name_or_path", None)
    with atomic_dir(out, overwrite) as tmp:
        # tensors are written as they are made: the whole output is never in memory at once
        with ShardWriter(tmp, max_bytes=max_shard_bytes, metadata={"format": "pt"}) as shards:
            for k, v in _plain_tensors(model, qnames, DTYPES[dtype]):
                shards.add(disk(k), v)
            for name, w in weights.items():
                for k, v in f.layer_tensors(name, w).items():
                    shards.add(disk(k), v)
            if kv is not None:
                for k, v in kv_tensors(meta["kv_cache"], spec_for(model)).items():
                    shards.add(k, v)
        files = shards.close()
        if fail_after_tensors:
            raise LowbitError("simulated failure after writing the tensors")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        for fname, text in f.extra_files(qcfg).items():
            (tmp / fname).write_text(text)
        if getattr(model, "generation_config", None) is not None:
            try:
                model.generation_config.save_pretrained(tmp)
            except (ValueError, OSError):
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(fmt, scheme, meta, qcfg, dict(counts)))
        for fname, data in (extra or {}).items():
            (tmp / fname).write_bytes(data)
        seal(tmp, serving_record(fmt, weights, meta))
    size = sum(p.stat().st_size for p in Path(out).iterdir() if p.suffix == ".safetensors")
    return {"format": fmt, "out": str(out), "scheme": scheme_name(scheme),
            "schemes": dict(counts.most_common()),
            "layers": len(weights), "shards": files, "tensor_bytes": size,
            "quantization_config": qcfg}


# ---------------------------------------------------------------- reading


def quant_format(path: Path) -> str | None:
    """The serving format of a checkpoint folder, from config.json's quantization_config."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    qcfg = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    return next((f.name for f in FORMATS.values() if f.quant_method == method), None)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{path}: no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors |= read_safetensors(path / f)
    return tensors


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(config dict, quantized weights by module name (GridWeight, or W8A8Linear modules),
    remaining tensors)."""
    path = Path(path)
    fmt = quant_format(path)
    if fmt is None:
        raise LowbitError(f"{path}: no compressed-tensors/gptq/awq quantization_config")
    cfg = json.loads((path / "config.json").read_text())
    tensors = _read_tensors(path)
    spec = spec_for_type(cfg.get("model_type"))
    if spec is not None and spec.moe is not None:  # checkpoint names -> lowbit's module names
        tensors = {checkpoint_name(spec, k, reverse=True): v for k, v in tensors.items()}
    qweights = FORMATS[fmt].read_layers(tensors, cfg["quantization_config"])
    if not qweights:
        raise LowbitError(f"{path}: no quantized Linears found for {fmt}")
    return cfg, qweights, tensors


def load_checkpoint(path: Path, cache_weights: bool = False) -> tuple[nn.Module, object]:
    """A compressed-tensors / GPTQ / AWQ folder as a lowbit model with runtime modules
    (``QLinear`` for grid weights, ``W8A8Linear`` for int-quantized W8A8)."""
    from transformers import AutoConfig

    path = Path(path)
    desc = {}
    if (path / "lowbit.json").is_file():  # written by lowbit: the files it records are intact
        desc = read_description(path)
        check_files(path, desc)
    cfg, qweights, tensors = read_checkpoint(path)
    kv = read_kv(cfg["quantization_config"], tensors, spec_for_type(cfg.get("model_type")))
    kv = desc.get("kv_cache") or kv  # lowbit's record names formats the checkpoint cannot hold
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = empty_model(config)
    unfuse_experts(model)  # MoE: one Linear per expert, as the checkpoint stores them
    names = list(qweights)
    for name in names:
        qw = qweights.pop(name)  # the module below keeps its own copy of the stored tensors
        parent_name, _, child = name.rpartition(".")  # lm_head: a child of the model itself
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        shape = qw.shape
        if not isinstance(old, nn.Linear) or tuple(old.weight.shape) != tuple(shape):
            raise LowbitError(f"{path}: {name} {shape} does not match the model's Linear")
        bias = tensors.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.float()
        if isinstance(qw, nn.Module):  # a runtime module already (W8A8)
            if bias is not None:
                qw.bias = nn.Parameter(bias, requires_grad=False)
            setattr(parent, child, qw)
            continue
        if not isinstance(qw, GridWeight):
            raise LowbitError(f"{path}: {name}: cannot load a {type(qw).__name__}")
        setattr(parent, child, QLinear(qw, bias, cache=cache_weights))
    qbuf = {f"{n}.{b}" for n, m in model.named_modules() if n in names
            for b in m.state_dict()}  # stored tensors and the bias given above
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    model, tok = finish_load(model, path, tensors, qbuf | tied, bool(tied))
    model.kv_cache_record = kv  # the KV cache the model was quantized for
    return model, tok
