"""Greedy or sampled batch-1 generation with a static KV cache and no per-token bookkeeping.

transformers' ``generate`` spends most of a small model's decode step outside the model
(logits processors, stopping criteria, a cache that grows by concatenation). Here the cache is
allocated once for the whole length (``StaticCache``), the prompt is one forward pass, and each
new token is one forward pass of one token at a known position - the loop ``lowbit generate``,
``lowbit chat`` and ``lowbit eval --speed`` share. ``compile=True`` compiles that single-token
step with ``torch.compile`` (inductor's C++ backend on CPU) once per model.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError


@dataclass
class Timing:
    """Seconds spent on the prompt (prefill) and on each new token after the first."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.decode_s)
        return len(self.decode_s) / total if total else 0.0


def max_positions(model: nn.Module) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


ATTENTION = "lowbit_decode"


def decode_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' SDPA attention, except for one query token with grouped keys and values:
    there the query heads that share a key/value head become that head's rows
    ``(b, h_kv, group, d)``, so keys and values are read as stored. transformers' own SDPA
    path does this only outside ``torch.compile``; inside, it repeats the whole static cache
    per query head at every step (``repeat_kv``), which cost 60% of a compiled SmolLM2 step at
    a 640-position cache (BENCHMARKS.md, issue 16). The same sums in the same order per head:
    the result equals the repeated form's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, h, n, d = query.shape
    if (n != 1 or groups == 1 or kwargs.get("position_bias") is not None or
            kwargs.get("softcap") is not None or
            (attention_mask is not None and attention_mask.shape[1] != 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout,
                                      scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, h // groups, groups, d), key, value, attn_mask=attention_mask,
        dropout_p=dropout, scale=scaling)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a model on transformers' SDPA attention to ``decode_attention`` (same masks);
    other implementations (eager for soft-capping models, ...) are left as they are."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or \
            not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
    return True


class Decoder:
    """Runs ``model`` one token at a time over a static cache of ``max_len`` positions
    (attention switched to ``decode_attention`` when the model uses SDPA)."""

    def __init__(self, model: nn.Module, max_len: int, compile: bool = False) -> None:
        from transformers import StaticCache

        limit = max_positions(model)
        if limit is not None and max_len > limit:
            raise LowbitError(f"prompt and new tokens take {max_len} positions; the model has "
                              f"{limit} (max_position_embeddings)")
        self.model = model
        self.max_len = max_len
        use_decode_attention(model)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        # transformers 5 renames past_key_values to cache (the old name warns)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._step = self._forward
        if compile:
            from lowbit.runtime.qlinear import QLinear

            for m in model.modules():  # built now: building inside the trace breaks the graph
                if isinstance(m, QLinear):
                    m.built_kernel()
            self._step = torch.compile(self._forward, dynamic=False)

    def _forward(self, ids: Tensor, pos: Tensor) -> Tensor:
        out = self.model(input_ids=ids, cache_position=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_arg: self.cache})
        return out.logits[:, -1, :]

    def reset(self) -> None:
        """Empty the cache for a new prompt (the compiled step is kept)."""
        self.cache.reset()

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        """Logits of the next token after the prompt ``ids`` (1, n), from an empty cache."""
        self.reset()
        n = ids.shape[1]
        if n >= self.max_len:
            raise LowbitError(f"a prompt of {n} tokens leaves no room in {self.max_len}")
        return self._forward(ids, torch.arange(n))

    @torch.inference_mode()
    def step(self, token: Tensor, position: int) -> Tensor:
        """Logits after one more token (1, 1) at ``position``."""
        return self._step(token.reshape(1, 1), torch.tensor([position]))


def pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """The next token: the most likely (temperature 0) or a sample at ``temperature``."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).reshape(-1)


def generate(model: nn.Module, ids: Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, seed: int = 0, stop: set[int] | None = None,
             compile: bool = False, timing: Timing | None = None,
             decoder: Decoder | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (stops after ``max_new_tokens`` or a ``stop`` id,
    which is yielded too). ``timing`` is filled as tokens come."""
    if max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    ids = ids.reshape(1, -1)
    n = ids.shape[1]
    dec = decoder or Decoder(model, n + max_new_tokens, compile)
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    t0 = time.perf_counter()
    tok = pick(dec.prefill(ids), temperature, gen)
    if timing is not None:
        timing.prompt_tokens, timing.prefill_s = n, time.perf_counter() - t0
    yield int(tok)
    for i in range(1, max_new_tokens):
        if stop and int(tok) in stop:
            return
        t0 = time.perf_counter()
        tok = pick(dec.step(tok, n + i - 1), temperature, gen)
        if timing is not None:
            timing.decode_s.append(time.perf_counter() - t0)
        yield int(tok)


def measure_speed(model: nn.Module, prompt: Tensor, new_tokens: int = 128,
                  compile: bool = False, warmup: int = 4,
                  on_token: Callable[[int], None] | None = None) -> Timing:
    """Prefill and decode tokens/s for batch 1 (a warm-up generation first, which also
    compiles the step when asked)."""
    prompt = prompt.reshape(1, -1)
    dec = Decoder(model, prompt.shape[1] + new_tokens, compile)
    for _ in generate(model, prompt[:, :8], warmup, decoder=dec):
        pass
    timing = Timing()
    for t in generate(model, prompt, new_tokens, timing=timing, decoder=dec):
        if on_token is not None:
            on_token(t)
    return timing
