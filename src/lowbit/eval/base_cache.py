"""The base model's log-probabilities over evaluation windows, computed once and reused.

Comparing N quantized variants with their base needs the base's token distributions N times;
like ``llama-perplexity --kl-divergence-base``, lowbit keeps them. ``BaseLogprobs`` computes
each window's log-probabilities on first use and stores them (float16, one file per window)
under ``LOWBIT_CACHE/base-logprobs/<key>/``, where the key hashes what determines them: the
base model's files (path, sizes, modification times), the dtype it ran in and the window
token ids. A later evaluation against the same base on the same windows reads them instead of
running the base. float16 log-probabilities move the KL by about 1e-4 relative (measured in
``tests/eval/test_base_cache.py``). A cache larger than ``LOWBIT_BASE_CACHE_GB`` (default 4)
is not written (the run says so) and the base runs in memory only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def model_fingerprint(path: Path) -> str:
    """Path, size and modification time of every file of a model (file or folder)."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def cache_key(fingerprint: str, windows: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(str(tuple(windows.shape)).encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cache_limit_bytes() -> float:
    return float(os.environ.get("LOWBIT_BASE_CACHE_GB", "4")) * 2**30


class BaseLogprobs:
    """``self[i]``: log-probabilities (1, L-1, vocab) float32 of window ``i``'s next tokens
    under the base model, from the disk cache when ``folder`` holds them."""

    def __init__(self, base: nn.Module | Callable[[], nn.Module], windows: torch.Tensor,
                 folder: Path | None = None):
        # ``base``: the model, or a function loading it (called only if a window is missing)
        self._base, self.windows = base, windows
        self.folder = folder
        self.computed = 0  # windows the base had to run on (tests, reports)

    @property
    def base(self) -> nn.Module:
        if not isinstance(self._base, nn.Module):
            self._base = self._base()
        return self._base

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    @torch.no_grad()
    def __getitem__(self, i: int) -> torch.Tensor:
        f = None if self.folder is None else self.folder / f"{i}.pt"
        if f is not None and f.is_file():
            try:
                return torch.load(f, weights_only=True).float()
            except (OSError, RuntimeError):
                pass  # a damaged entry is recomputed and rewritten
        ids = self.windows[i : i + 1]
        out = self.base(input_ids=ids).logits[:, :-1].float()
        lp = torch.log_softmax(out, dim=-1)
        self.computed += 1
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp")
            torch.save(lp.half(), tmp)
            tmp.replace(f)
            return lp.half().float()  # the same values a cached read gives
        return lp


class HeldLogprobs:
    """Every window's base log-probabilities computed now and held in memory as float16 (as
    the disk cache keeps them): for a base model about to be quantized in place."""

    def __init__(self, base: nn.Module, windows: torch.Tensor):
        lp = BaseLogprobs(base, windows)
        self.lps = [lp[i].half() for i in range(len(lp))]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.lps[i].float()


def base_logprobs(base: nn.Module | Callable[[], nn.Module], windows: torch.Tensor, vocab: int,
                  key: str | None, cache_root: Path | None,
                  note: Callable[[str], None] = lambda _m: None) -> BaseLogprobs:
    """A BaseLogprobs for ``base`` on ``windows``, cached on disk when ``key`` (what identifies
    the base: its files and dtype, ``model_fingerprint``) and ``cache_root`` are given and the
    cache fits the size limit."""
    folder = None
    if key is not None and cache_root is not None:
        size = windows.shape[0] * (windows.shape[1] - 1) * vocab * 2
        if size <= cache_limit_bytes():
            folder = cache_root / "base-logprobs" / cache_key(key, windows)
        else:
            note(f"base log-probabilities ({size / 2**30:.1f} GiB) exceed LOWBIT_BASE_CACHE_GB; "
                 "not cached")
    return BaseLogprobs(base, windows, folder)
