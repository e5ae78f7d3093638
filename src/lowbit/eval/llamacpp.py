"""llama.cpp as the judge of GGUF files, through llama-cpp-python (an optional dependency).

`llamacpp_perplexity` evaluates token windows with llama.cpp and computes the protocol's
perplexity from the returned logits (positions 1..L-1 of each window, context reset between
windows); `llamacpp_generate` decodes greedily; `llamacpp_quantize` runs llama.cpp's own
quantizer (what `llama-quantize` does), optionally with an importance matrix.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.io.gguf.presets import get_preset


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LowbitError(
            "this needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp)"
        ) from None
    return llama_cpp


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs to fd 2 from C; silence it for the duration."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def load_llama(path: str | Path, n_ctx: int = 512, n_threads: int | None = None):
    """A llama_cpp.Llama over a GGUF file, every position's logits kept."""
    llama_cpp = _llama_cpp()
    with _quiet_stderr():
        try:
            return llama_cpp.Llama(
                model_path=str(path),
                logits_all=True,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise LowbitError(f"llama.cpp cannot load {path}: {e}") from None


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    x = logits[:-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return float((lse - x[np.arange(len(ids) - 1), ids[1:]]).sum())


def llamacpp_perplexity(
    path: str | Path, windows: torch.Tensor, n_threads: int | None = None, llm=None
) -> dict:
    """Perplexity of a GGUF file through llama.cpp on (n, L) token windows."""
    n, seq = windows.shape
    llm = llm or load_llama(path, n_ctx=seq, n_threads=n_threads)
    nll, tokens = 0.0, 0
    for w in windows:
        ids = w.numpy()
        llm.reset()
        llm.eval(ids.tolist())
        nll += _nll(np.asarray(llm.scores[: len(ids)]), ids)
        tokens += len(ids) - 1
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "windows": n}


def llamacpp_logits(llm):
    """``ids (b, L) -> logits (b, L, vocab)`` from llama.cpp, each window from an empty
    context (the source ``lowbit.eval.metrics.evaluate_logits`` takes)."""

    def logits(ids: torch.Tensor) -> torch.Tensor:
        out = []
        for w in ids:
            llm.reset()
            llm.eval(w.tolist())
            out.append(torch.from_numpy(np.array(llm.scores[: w.numel()], dtype=np.float32)))
        return torch.stack(out)

    return logits


def llamacpp_generate(path: str | Path, prompt_ids: list[int], n: int = 32, llm=None) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by llama.cpp: ``n`` token ids."""
    llm = llm or load_llama(path, n_ctx=max(64, len(prompt_ids) + n))
    llm.reset()
    llm.eval(list(prompt_ids))
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def llamacpp_quantize(
    src: str | Path,
    dst: str | Path,
    qtype: str,
    imatrix: Mapping[str, np.ndarray] | None = None,
    n_threads: int = 0,
) -> None:
    """llama.cpp's own quantizer: ``src`` (F32/F16 GGUF) -> ``dst`` of preset ``qtype``.

    ``imatrix`` goes in through `llama_model_quantize_params.imatrix`, the array of
    (name, values, size) entries that `llama-quantize --imatrix FILE` builds from its file.
    """
    lc = _llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = get_preset(qtype).ftype
    params.nthread = n_threads
    keep = []
    if imatrix:
        entries = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
            key = name.encode()
            keep += [arr, key]
            entries[i].name = key
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # terminator
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(lc.llama_model_imatrix_data))
    with _quiet_stderr():
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise LowbitError(f"llama.cpp failed to quantize {src} to {qtype} (code {rc})")
