"""Quality, speed and memory of a model: perplexity, KL and top-1 against a base, tok/s, RSS."""

from __future__ import annotations

import math
import resource

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.eval.base_cache import BaseLogprobs
from lowbit.runtime.qlinear import decoded_once


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    base: nn.Module | BaseLogprobs | None = None,
    batch: int = 1,
    progress: bool = True,
    desc: str = "eval",
) -> dict:
    """Perplexity over every predicted token (positions 1..L-1 of each window, each from its
    own window's prefix); with ``base`` (a model, or its log-probabilities computed once:
    ``BaseLogprobs``): mean KL(base || model), its 99th percentile over tokens, and top-1
    agreement, on the same positions. ``batch`` windows go through the model at a time."""
    if isinstance(base, nn.Module):
        base = BaseLogprobs(base, windows)
    with decoded_once(model):
        return _evaluate(model, windows, base, batch, progress, desc)


def _evaluate(model: nn.Module, windows: torch.Tensor, base: BaseLogprobs | None, batch: int,
              progress: bool, desc: str) -> dict:
    nll_sum, n_tok = 0.0, 0
    kls: list[torch.Tensor] = []
    agree = 0
    for i in tqdm(range(0, windows.shape[0], batch), desc=desc, disable=not progress, leave=False):
        ids = windows[i : i + batch]
        lp = torch.log_softmax(_logits(model, ids)[:, :-1], dim=-1)
        tgt = ids[:, 1:]
        nll_sum += float(-lp.gather(-1, tgt[..., None]).sum())
        n_tok += tgt.numel()
        if base is not None:
            blp = torch.cat([base[j] for j in range(i, i + ids.shape[0])])
            kls.append((blp.exp() * (blp - lp)).sum(-1).flatten())
            agree += int((blp.argmax(-1) == lp.argmax(-1)).sum())
        del lp
    out = {
        "ppl": math.exp(nll_sum / n_tok),
        "nll": nll_sum / n_tok,
        "tokens": n_tok,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
    }
    if base is not None:
        kl = torch.cat(kls).double()
        out |= {
            "kl_mean": float(kl.mean()),
            "kl_p99": float(torch.quantile(kl, 0.99)),
            "top1": agree / n_tok,
        }
    return out


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors counted once) and by the
    kernels' packed copies of quantized weights made so far (``lowbit.runtime.kernels``)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    from lowbit.runtime.qlinear import QLinear

    return total + sum(m.kernel_bytes() for m in model.modules() if isinstance(m, QLinear))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
