"""Greedy or sampled batch-1 generation with a static KV cache and no per-token bookkeeping.

transformers' ``generate`` spends most of a small model's decode step outside the model
(logits processors, stopping criteria, a cache that grows by concatenation). Here the cache is
allocated once for the whole length (``StaticCache``), the prompt is one forward pass, and each
new token is one forward pass of one token at a known position - the loop ``lowbit generate``,
``lowbit chat`` and ``lowbit eval --speed`` share. ``compile=True`` compiles that single-token
step with ``torch.compile`` (inductor's C++ backend on CPU, with its C++ wrapper) once per
model.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, partial

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.runtime.qlinear import fuse_siblings


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
# inductor's C++ wrapper calls the step's ~400 kernels and ops from C++ instead of Python: 10%
# faster per SmolLM2 token (BENCHMARKS.md, issue 16). Built separately from the kernels, the
# first compile takes ~80 s (one C++ file for the whole step: ~330 s; the Python wrapper: 60 s)
COMPILE_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}


@cache
def attention_kernel() -> str:
    """What ``decode_attention`` multiplies one query token through: ``decode_attn`` (lowbit's
    C++ op, ``attention.cpp``) when lowbit's CPU kernels build here, else ``sdpa``."""
    from lowbit.runtime import cpu

    try:
        cpu.ops()
    except LowbitError:
        return "sdpa"
    return "decode_attn"


def decode_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, *, op=None, isa: int = 0,
                     **kwargs) -> tuple[Tensor, None]:
    """transformers' SDPA attention, except for one fp32 query token: there the query heads
    that share a key/value head become that head's rows ``(b, h_kv, group, d)``, so keys and
    values are read as stored, and only the positions the mask lets through are read
    (``op``: ``lowbit_cpu::decode_attn`` in variant ``isa``; packed rows through SDPA when
    None).
    transformers' own SDPA path packs the heads only outside ``torch.compile``; inside, it
    repeats the whole static cache per query head at every step (``repeat_kv``), which cost 60%
    of a compiled SmolLM2 step at a 640-position cache (BENCHMARKS.md, issue 16); and SDPA reads
    every position of the static cache, used or not. Results equal SDPA's to fp32 rounding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, h, n, d = query.shape
    if (n != 1 or dropout or any(kwargs.get(k) is not None for k in _OTHER_TERMS) or
            (attention_mask is not None and attention_mask.shape[1:3] != (1, 1))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout,
                                      scaling, **kwargs)
    rows = query.reshape(b, h // groups, groups, d)
    scale = scaling if scaling is not None else d**-0.5
    if op is not None and query.dtype == key.dtype == value.dtype == torch.float32 and \
            (attention_mask is None or attention_mask.dtype in (torch.bool, torch.float32)):
        out = op(rows, key, value, attention_mask, scale, isa)
    elif groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout,
                                      scaling, **kwargs)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            rows, key, value, attn_mask=attention_mask, scale=scale)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


# attention terms beyond softmax(q k^T + mask) v: SDPA's path handles them
_OTHER_TERMS = ("position_bias", "softcap", "s_aux", "sinks")


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a model on transformers' SDPA attention to ``decode_attention`` (same masks);
    other implementations (eager for soft-capping models, ...) are left as they are."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or \
            not hasattr(model, "set_attn_implementation"):
        return False
    op = isa = None
    if attention_kernel() == "decode_attn":
        from lowbit.runtime import cpu

        op, isa = cpu.ops().decode_attn, cpu.ISAS[cpu.isa()]
    AttentionInterface.register(ATTENTION, partial(decode_attention, op=op, isa=isa))
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
        # every kernel built now (building inside the trace breaks the graph), those of Linears
        # that read one input fused into one
        fuse_siblings(model)
        if compile:
            self._step = torch.compile(self._forward, dynamic=False,
                                       options=COMPILE_OPTIONS)

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
             decoder: Decoder | None = None, cache=None) -> Iterator[int]:
    """Yield new token ids one at a time (stops after ``max_new_tokens`` or a ``stop`` id,
    which is yielded too). ``timing`` is filled as tokens come. ``cache``: a transformers
    ``Cache`` (a quantized KV cache, ``lowbit.runtime.kvcache``) that the model's own forward
    pass reads and fills, instead of the compiled step's static cache."""
    if max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    ids = ids.reshape(1, -1)
    n = ids.shape[1]
    if cache is not None:
        yield from _generate_with_cache(model, ids, max_new_tokens, temperature, seed, stop,
                                        timing, cache)
        return
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


@torch.no_grad()
def _generate_with_cache(model, ids, max_new_tokens, temperature, seed, stop, timing, cache):
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    t0 = time.perf_counter()
    tok = pick(model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1], temperature,
               gen)
    if timing is not None:
        timing.prompt_tokens, timing.prefill_s = ids.shape[1], time.perf_counter() - t0
    yield int(tok)
    for _ in range(1, max_new_tokens):
        if stop and int(tok) in stop:
            return
        t0 = time.perf_counter()
        logits = model(input_ids=tok.reshape(1, 1), cache=cache, use_cache=True).logits
        tok = pick(logits[:, -1], temperature, gen)
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
