"""Calibration and evaluation text: sources, tokenization, deterministic windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import LowbitError


def pydoc_text() -> str:
    """Python's own documentation topics (standard library), in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: str | Path, field: str = "text") -> str:
    """A plain text file (any line ends), or JSONL with a text field per line."""
    p = Path(path)
    try:
        raw = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise LowbitError(f"cannot read text file {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LowbitError(f"{p} is not UTF-8 text") from None
    raw = raw.replace("\r\n", "\n")
    if p.suffix in (".jsonl", ".ndjson"):
        parts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LowbitError(f"{p}:{i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or field not in rec:
                raise LowbitError(f"{p}:{i}: no {field!r} field")
            parts.append(str(rec[field]))
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise LowbitError(f"{p} holds no text")
    return raw


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(
    ids: torch.Tensor, n: int, seq_len: int, start: int = 0, what: str = "text"
) -> torch.Tensor:
    """Non-overlapping windows ``start .. start+n-1`` of ``seq_len`` tokens: (n, seq_len)."""
    if seq_len < 2:
        raise LowbitError(f"sequence length must be at least 2, not {seq_len}")
    have = ids.numel() // seq_len - start
    if n < 1 or have < n:
        raise LowbitError(
            f"{what} too short: {ids.numel()} tokens give {max(have, 0)} windows of {seq_len} "
            f"after skipping {start}, {n} needed"
        )
    return ids[start * seq_len : (start + n) * seq_len].reshape(n, seq_len)
