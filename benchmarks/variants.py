"""Benchmark variants as ``method:scheme[:key=value,...]``: the CLI's recipe shorthand plus any
step option (``gptq:w4g64:act_order=0,damp=0.05``, ``awq+gptq:w3g64:search_windows=1``,
``llm-int8:-:threshold=4,kernel=emulate``); ``-`` for no scheme; ``rotate+`` before the method
puts the fused rotations first (``rotate+gptq:w3g64``, the CLI's ``--rotate``), ``rotate4+``
adds R4 online (``--rotate --rotate-online``), ``incoh+`` incoherence processing alone
(``--incoherence``) and ``rotate+incoh+`` both; ``PRUNER@SPARSITY+`` prunes first
(``wanda@2:4+gptq:w4g64``, the CLI's ``--prune wanda --sparsity 2:4``; ``sparsegpt@0.5+none``
prunes alone; ``wanda-owl@0.7+none`` adds ``--owl``; ``structured@0.25+none`` is
``--prune-structured 0.25``). Values are typed from the steps' own option annotations."""

from __future__ import annotations

from typing import get_args, get_type_hints

from lowbit.methods.base import STEPS
from lowbit.recipe import METHODS, Recipe, pruned, rotated, shorthand, shrunk


def _typed(key: str, value: str, method: str):
    for name in METHODS[method]:
        hints = get_type_hints(STEPS[name])
        if key in hints:
            kinds = [k for k in (get_args(hints[key]) or (hints[key],)) if k is not type(None)]
            if value.lower() == "none":
                return None
            kind = kinds[0]
            if kind is bool:
                return value.lower() in ("1", "true", "yes")
            return kind(value)
    return value  # shorthand refuses it with the CLI's message


def parse_variant(v: str) -> Recipe:
    prefixes = {"rotate", "rotate4", "incoh"}
    head = []
    while v.split("+", 1)[0] in prefixes and "+" in v:
        p, v = v.split("+", 1)
        head.append(p)
    if head:
        return rotated(parse_variant(v), online="rotate4" in head, incoherent="incoh" in head,
                       fused="rotate" in head or "rotate4" in head)
    if "@" in v.split("+", 1)[0] and "+" in v:
        p, v = v.split("+", 1)
        method, amount = p.split("@")
        rest = None if v == "none" else parse_variant(v)
        if method == "structured":
            return shrunk(rest, float(amount))
        return pruned(rest, method.removesuffix("-owl"), amount, owl=method.endswith("-owl"))
    parts = v.split(":")
    method = parts[0]
    scheme = parts[1] if len(parts) > 1 and parts[1] != "-" else None
    kw = {}
    for item in (parts[2].split(",") if len(parts) > 2 and parts[2] else []):
        k, val = item.split("=")
        kw[k] = _typed(k, val, method)
    return shorthand(method, scheme, **kw)
