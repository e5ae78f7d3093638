"""Where calibration and evaluation windows come from.

Sources: a path (plain text or JSONL), ``pydoc`` (Python's documentation topics),
``self`` (text sampled from the model itself, as LLM-QAT does; cached), and ``builtin``,
the default chosen by measurement (see BENCHMARKS.md). When calibration and evaluation
read the same source, calibration windows start after the evaluation windows, so the
two never overlap.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import data
from lowbit.arch import text_config
from lowbit.errors import LowbitError
from lowbit.models import cache_dir

BUILTIN_CALIB = "self"
BUILTIN_EVAL = "pydoc"
SOURCES = ("builtin", "pydoc", "self")


def _resolve(source: str, default: str) -> str:
    return default if source == "builtin" else source


class _Tick:
    """A logits processor that changes nothing and advances a progress bar by one step."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.bar.update(1)
        return scores


@torch.no_grad()
def self_generated(
    model: nn.Module, n: int, seq_len: int, seed: int = 0, batch: int = 32, progress: bool = True
) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens sampled from the model (temperature 1), each
    started from BOS and one random token; cached on disk by model and settings."""
    cfg = text_config(model)
    key = hashlib.sha256(
        f"{cfg.model_type}-{cfg.vocab_size}-{cfg.hidden_size}-{cfg.num_hidden_layers}-"
        f"{sum(float(p.detach().double().sum()) for p in model.parameters()):.6e}".encode()
    ).hexdigest()[:16]
    path = cache_dir() / "calib" / f"self-{key}-{n}x{seq_len}-s{seed}.pt"
    if path.is_file():
        return torch.load(path)
    from transformers import LogitsProcessorList

    gen = torch.Generator().manual_seed(seed)
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 0
    out = []
    steps = seq_len - 2
    # one tick per generated token of each batch: the bar has an ETA from the first seconds
    bar = tqdm(total=-(-n // batch) * steps, desc="sampling calibration text", unit="tok",
               unit_scale=min(batch, n), disable=not progress)
    for i in range(0, n, batch):
        b = min(batch, n - i)
        first = torch.randint(0, cfg.vocab_size, (b, 1), generator=gen)
        ids = torch.cat([torch.full((b, 1), bos), first], dim=1)
        torch.manual_seed(seed * 1000 + i)
        seqs = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=steps,
            min_new_tokens=steps,
            pad_token_id=bos,
            logits_processor=LogitsProcessorList([_Tick(bar)]),
        )
        out.append(seqs[:, :seq_len])
    bar.close()
    w = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(w, path)
    return w


def source_ids(source: str, tokenizer) -> torch.Tensor:
    """All tokens of a text source (not for ``self``)."""
    if source == "pydoc":
        return data.tokenize(tokenizer, data.pydoc_text())
    if source in SOURCES:
        raise LowbitError(f"{source!r} is not a text")
    return data.tokenize(tokenizer, data.read_text(source))


def eval_windows(source: str, tokenizer, n: int, seq_len: int) -> torch.Tensor:
    src = _resolve(source, BUILTIN_EVAL)
    if src == "self":
        raise LowbitError("evaluation text cannot be self-generated")
    return data.windows(source_ids(src, tokenizer), n, seq_len, 0, what=f"evaluation text {src}")


def source_key(source: str, default: str) -> str:
    """A stable name for a source: built-in name or resolved path."""
    src = _resolve(source, default)
    return src if src in SOURCES else str(Path(src).resolve())


def calib_windows(
    source: str,
    model: nn.Module,
    tokenizer,
    n: int,
    seq_len: int,
    offset: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Calibration windows and a record of where they came from (kept with the output so
    that an evaluation on the same text can refuse overlapping windows)."""
    src = _resolve(source, BUILTIN_CALIB)
    record = {
        "source": source_key(source, BUILTIN_CALIB),
        "windows": n,
        "seq_len": seq_len,
        "offset": offset,
    }
    if src == "self":
        return self_generated(model, n, seq_len, progress=progress), record
    ids = source_ids(src, tokenizer)
    return data.windows(ids, n, seq_len, offset, what=f"calibration text {src}"), record


def check_disjoint(calib: dict | None, eval_source: str, n: int, seq_len: int) -> None:
    """Refuse an evaluation whose token range overlaps the calibration's on the same text."""
    if not calib or calib.get("source") != source_key(eval_source, BUILTIN_EVAL):
        return
    c0 = calib["offset"] * calib["seq_len"]
    c1 = c0 + calib["windows"] * calib["seq_len"]
    if c0 < n * seq_len and 0 < c1:
        raise LowbitError(
            f"evaluation windows (tokens 0..{n * seq_len}) overlap the calibration windows "
            f"(tokens {c0}..{c1}) of the same text; evaluate fewer windows or calibrate with "
            "--calib-offset past them"
        )
