"""Perplexity where the KV cache is used: each window's first part is prefilled, then every
later token is fed alone and predicts the next from the (quantized) cache, as in decoding.
``decode_tokens_per_s`` counts tokens of all windows decoded together (``batch``).
The reference is the same model's full forward pass over the window (a full-precision cache
gives the same logits to fp32 rounding), so KL and top-1 compare the cache alone."""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.metrics import against_base, kl_divergence
from lowbit.formats.kv import KVSpec
from lowbit.runtime.kvcache import QuantKVCache, kv_bytes_formula


@torch.no_grad()
def kv_evaluate(model: nn.Module, windows: torch.Tensor, spec: KVSpec,
                scales: list | None = None, prefill: int | None = None,
                progress: bool = True, batch: int = 1) -> dict:
    """Scores tokens ``prefill .. L - 1`` of each window (``prefill``: half the window by
    default), each predicted one step at a time through a ``QuantKVCache`` of ``spec``
    (``scales``: float8's, from ``calibrate_kv``), ``batch`` windows at a time (every scale of
    the formats is per window, so batching changes nothing but the speed). Returns perplexity of
    the cache and of the full-precision pass on the same tokens, the ``against_base``
    statistics, and the cache's bytes per token: measured from its stored tensors at the end of
    a window (``kv_bytes_per_token``, the residual window included), per stored token
    (``kv_stored_bytes_per_token``) and the fp16 formula's (``kv_fp16_bytes_per_token``)."""
    n, L = windows.shape
    p = L // 2 if prefill is None else prefill
    if not 1 <= p < L - 1:
        raise LowbitError(f"prefill must leave tokens to score: 1 <= prefill < {L - 1}")
    if batch < 1:
        raise LowbitError(f"batch must be at least 1, not {batch}")
    kl, dp, nll, nll_base = [], [], [], []
    agree, steps, seconds = 0, 0, 0.0
    nbytes = {"stored": 0, "residual": 0}
    stored_tokens = cached_tokens = 0
    bar = tqdm(total=n * (L - p), desc=f"eval kv {spec.name}", disable=not progress,
               leave=False, unit="tok")
    cache = None
    for i in range(0, n, batch):
        ids = windows[i:i + batch]
        b = ids.shape[0]
        base = torch.cat([torch.log_softmax(
            model(input_ids=w[None], use_cache=False).logits.float()[:, p - 1:L - 1], -1)
            for w in ids])
        cache = QuantKVCache(model, spec, keep_decoded=True, scales=scales)
        logits = [model(input_ids=ids[:, :p], cache=cache, use_cache=True).logits[:, -1].float()]
        bar.update(b)
        t0 = time.perf_counter()
        for t in range(p, L - 1):
            logits.append(model(input_ids=ids[:, t:t + 1], cache=cache,
                                use_cache=True).logits[:, -1].float())
            bar.update(b)
        seconds += time.perf_counter() - t0
        steps += (L - 1 - p) * b
        lp = torch.log_softmax(torch.stack(logits, 1), -1)  # predicts tokens p .. L-1
        tgt = ids[:, p:]
        tok_nll = -lp.gather(-1, tgt[..., None]).squeeze(-1)
        tok_base = -base.gather(-1, tgt[..., None]).squeeze(-1)
        kl.append(kl_divergence(base, lp).flatten())
        dp.append((tok_nll.neg().exp() - tok_base.neg().exp()).flatten())
        nll.append(tok_nll.flatten())
        nll_base.append(tok_base.flatten())
        agree += int((base.argmax(-1) == lp.argmax(-1)).sum())
        nbytes = {k: nbytes[k] + v for k, v in cache.nbytes().items()}
        stored_tokens += cache.layers[0].stored * b
        cached_tokens += cache.layers[0].get_seq_length() * b
        del base, lp, logits
    bar.close()
    cat = [torch.cat(x).double() for x in (kl, dp, nll, nll_base)]
    out = {"kv": spec.name, "ppl": math.exp(float(cat[2].mean())), "tokens": int(cat[2].numel()),
           "windows": n, "seq_len": L, "prefill": p}
    out |= against_base(*cat, agree)
    out["ppl_fp_cache"] = out.pop("ppl_base")
    assert cache is not None
    layers, heads, d = len(cache.layers), cache.kv_heads, cache.head_dim
    out["kv_bytes_per_token"] = (nbytes["stored"] + nbytes["residual"]) / cached_tokens
    out["kv_stored_bytes_per_token"] = (nbytes["stored"] / stored_tokens
                                        if stored_tokens else None)
    out["kv_fp16_bytes_per_token"] = kv_bytes_formula(layers, heads, d, 2)
    out["kv_bytes_ratio_fp16"] = out["kv_bytes_per_token"] / out["kv_fp16_bytes_per_token"]
    out["decode_tokens_per_s"] = steps / seconds if seconds else None
    return out
