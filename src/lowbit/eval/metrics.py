"""Quality, speed and memory of a model: perplexity, KL and top-1 against a base, tok/s, RSS."""

from __future__ import annotations

import math
import resource
from collections.abc import Callable

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
    ``BaseLogprobs``): ``against_base``'s statistics (KL divergence, Δp, top-1 agreement,
    perplexity ratio) on the same positions. ``batch`` windows go through the model at a time."""
    if isinstance(base, nn.Module):
        base = BaseLogprobs(base, windows)
    with decoded_once(model):
        return evaluate_logits(lambda ids: _logits(model, ids), windows, base, batch, progress,
                               desc)


def evaluate_logits(logits: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor,
                    base: BaseLogprobs | None, batch: int = 1, progress: bool = True,
                    desc: str = "eval") -> dict:
    """``evaluate`` for any source of logits: ``logits(ids)`` gives (b, L, vocab) for (b, L)
    token windows (llama.cpp's, for a GGUF file: ``lowbit.eval.llamacpp.llamacpp_logits``)."""
    nll_sum, n_tok = 0.0, 0
    per_token: dict[str, list[torch.Tensor]] = {"kl": [], "dp": [], "nll": [], "nll_base": []}
    agree = 0
    for i in tqdm(range(0, windows.shape[0], batch), desc=desc, disable=not progress, leave=False):
        ids = windows[i : i + batch]
        lp = torch.log_softmax(logits(ids).float()[:, :-1], dim=-1)
        tgt = ids[:, 1:]
        nll = -lp.gather(-1, tgt[..., None]).squeeze(-1)
        nll_sum += float(nll.sum())
        n_tok += tgt.numel()
        if base is not None:
            blp = torch.cat([base[j] for j in range(i, i + ids.shape[0])])
            nll_base = -blp.gather(-1, tgt[..., None]).squeeze(-1)
            per_token["kl"].append(kl_divergence(blp, lp).flatten())
            per_token["dp"].append(((-nll).exp() - (-nll_base).exp()).flatten())
            per_token["nll"].append(nll.flatten())
            per_token["nll_base"].append(nll_base.flatten())
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
        out |= against_base(*(torch.cat(per_token[k]).double() for k in
                              ("kl", "dp", "nll", "nll_base")), agree)
    return out


def kl_divergence(base_lp: torch.Tensor, lp: torch.Tensor,
                  base_p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(base || model) of each position's next-token distribution, from log-probabilities
    over the last dimension (``base_p``: ``base_lp.exp()``, when the caller keeps it)."""
    return ((base_lp.exp() if base_p is None else base_p) * (base_lp - lp)).sum(-1)


# the percentiles llama-perplexity --kl-divergence prints (KLD: 99.9 ... 0.1; Δp: those and
# 75 / 25), linearly interpolated between the sorted values as it does
KLD_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001)
DP_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001)


def percentile(sorted_values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of ascending values, interpolated at ``q * (n - 1)``."""
    pos = q * (sorted_values.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, sorted_values.numel() - 1)
    return float(sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo]))


def _tag(q: float) -> str:
    return f"{100 * q:g}".replace(".", "")  # 0.999 -> 999, 0.99 -> 99, 0.001 -> 01


def against_base(kl: torch.Tensor, dp: torch.Tensor, nll: torch.Tensor, nll_base: torch.Tensor,
                 same_top: int) -> dict:
    """Statistics over tokens of a model against its base, defined as
    ``llama-perplexity --kl-divergence`` defines them: per token, ``kl`` = KL(base || model) of
    the next-token distributions, ``dp`` = p_model(next) - p_base(next), ``nll`` / ``nll_base``
    the negative log-likelihoods of the next token; ``same_top``: tokens whose most likely
    next token is the same. Keys ``kld_<p>`` / ``dp_<p>`` are percentiles (``kld_p999`` is
    99.9%, ``dp_p01`` 0.1%)."""
    n = kl.numel()
    ks, ds = kl.sort().values, dp.sort().values
    out = {"kld_mean": float(kl.mean()), "kld_median": percentile(ks, 0.5),
           "kld_max": float(ks[-1]), "kld_min": float(ks[0])}
    out |= {f"kld_p{_tag(q)}": percentile(ks, q) for q in KLD_PERCENTILES}
    out |= {"dp_mean": float(dp.mean()), "dp_median": percentile(ds, 0.5),
            "dp_max": float(ds[-1]), "dp_min": float(ds[0]),
            "rms_dp": float(dp.square().mean().sqrt())}
    out |= {f"dp_p{_tag(q)}": percentile(ds, q) for q in DP_PERCENTILES}
    ln_ratio = float(nll.mean() - nll_base.mean())
    cor = torch.corrcoef(torch.stack([nll, nll_base]))[0, 1] if n > 1 else torch.tensor(1.0)
    out |= {"ppl_base": math.exp(float(nll_base.mean())), "ln_ppl_ratio": ln_ratio,
            "ppl_ratio": math.exp(ln_ratio), "cor_ln_ppl": float(cor),
            "same_top_p": same_top / n}
    # the names lowbit used first
    out |= {"kl_mean": out["kld_mean"], "kl_p99": out["kld_p99"], "top1": out["same_top_p"]}
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
