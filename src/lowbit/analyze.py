"""How much each Linear costs the model at each scheme, and schemes chosen to a size budget.

``measure`` quantizes one block Linear at a time (RTN onto each candidate scheme, every other
weight left as it is) and records the KL divergence of the model's next-token distributions
from the unquantized model's on calibration windows: the measured sensitivity. The float
model's inputs to every block are kept from one pass of the calibration driver, so a layer's
run starts at its own block. The same pass gives each layer's Hessian proxy, ``tr(dW H dW^T)``
with ``H = 2 X^T X / n`` its input statistics, whose agreement with the measured KL is reported
as a Spearman rank correlation.

``choose`` picks one scheme per layer minimising the summed KL under a byte budget: an exact
multiple-choice knapsack over the layers' stored bytes (the formats' own accounting, scales
included), solved by dynamic programming in units of the costs' greatest common divisor.
``budget_recipe`` writes the choice as an ordinary recipe: the rounder's scheme is the most
frequent choice and the others are per-layer overrides. Measured KLs are assumed to add up.
Linears that read one input (q/k/v, gate/up: ``input`` in the measurement) are one item of the
knapsack with one scheme (``tied``), as serving engines that fuse them require.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from functools import reduce
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec, get_blocks, get_weight, set_weight, spec_for, text_config
from lowbit.errors import LowbitError
from lowbit.eval.metrics import kl_divergence
from lowbit.formats import ggml
from lowbit.formats.ggml import GGML_TYPES
from lowbit.formats.grid_base import WeightGrid
from lowbit.formats.grids import get_grid
from lowbit.formats.weight import GridWeight
from lowbit.io.gguf.presets import fallback
from lowbit.methods.base import STEPS, Rounder
from lowbit.methods.rtn import RTN, grid_loss, hessian_loss, rtn
from lowbit.pipeline.driver import BlockContext, block_output, run_sequential
from lowbit.pipeline.stats import InputStats
from lowbit.recipe import Recipe
from lowbit.runtime.qlinear import QuantModule

FORMAT = "lowbit-sensitivity"


def is_ggml(scheme: str) -> bool:
    """A llama.cpp block type (Q4_K, Q8_0 ...) rather than a lowbit scheme."""
    return scheme.upper() in GGML_TYPES


def round_ggml(w: Tensor, ggml_type: str) -> tuple[Tensor, int, str] | None:
    """``w`` (out, in) as llama-quantize stores it in ``ggml_type`` without an importance
    matrix: (decoded weight, stored bytes, the type stored), in llama.cpp's fallback type where
    the rows do not fill its blocks (Q4_K -> Q5_0 for 576 columns); None when no quantized type
    fits."""
    t = fallback(ggml_type.upper(), w.shape[1])
    if t not in GGML_TYPES:
        return None
    data = ggml.quantize(t, w.float().numpy())
    return torch.from_numpy(ggml.dequantize(t, data, w.shape[1])), int(data.nbytes), t


class _Recorder:
    """A driver visitor that changes nothing: it keeps each block's inputs (of the ``sample``
    stream when there is one) and, per Linear and scheme, the rounded weight with its stored
    bytes and Hessian proxy."""

    def __init__(self, schemes: list[str], rounder: Rounder, keep_sample: bool) -> None:
        self.schemes, self.rounder, self.keep_sample = schemes, rounder, keep_sample
        self.inputs: list[tuple[list[Tensor], list[dict]]] = []
        self.layers: dict[str, dict] = {}
        self.rounded: dict[tuple[str, str], GridWeight] = {}

    def keep(self, grid: WeightGrid) -> bool:
        """Whether the rounded weight is kept for the KL runs (1 byte a weight per scheme):
        plain RTN without the Hessian diagonal is rounded again there instead."""
        return not isinstance(self.rounder, RTN) or grid.needs_sensitivity

    def transform(self, ctx: BlockContext) -> None:
        stream = ctx.sample if self.keep_sample else ctx.main
        self.inputs.append((stream.hidden, stream.kwargs))

    def wants(self, ctx: BlockContext, group) -> frozenset[str]:
        return frozenset({"hessian"})

    def round(self, ctx: BlockContext, group, stats: InputStats) -> None:
        weights = {n: get_weight(ctx.linears[n], ctx.spec).float() for n in group}
        rows = {n: {"block": ctx.index, "kind": n, "shape": list(w.shape), "numel": w.numel(),
                    "input": [ctx.full(m) for m in group], "schemes": {}}
                for n, w in weights.items()}
        for s in self.schemes:
            if is_ggml(s):
                for n, w in weights.items():
                    r = round_ggml(w, s)
                    if r is None or any(c.get("type") == r[2]
                                        for c in rows[n]["schemes"].values()):
                        continue  # no type fits, or another candidate's fallback is this type
                    wq, nbytes, t = r
                    rows[n]["schemes"][s] = {"bytes": nbytes, "bpw": 8 * nbytes / w.numel(),
                                             "proxy": hessian_loss(wq - w, stats.h), "type": t}
                continue
            grid = get_grid(s)
            fits = {}
            for n, w in weights.items():
                try:
                    grid.check(*w.shape)
                    fits[n] = w
                except LowbitError:
                    pass  # this scheme cannot hold this layer (its group size)
            done = self.rounder.round_layers(fits, dict.fromkeys(fits, grid), stats)
            for n, (gw, _) in done.items():
                rows[n]["schemes"][s] = {"bytes": gw.storage_bytes(),
                                         "bpw": gw.bits_per_weight(),
                                         "proxy": grid_loss(gw, weights[n], stats.h)}
                if self.keep(grid):
                    self.rounded[ctx.full(n), s] = gw
        for n, row in rows.items():
            self.layers[ctx.full(n)] = row

    def replace(self, ctx: BlockContext) -> bool:
        return False

    def finish(self, ctx: BlockContext) -> None:
        pass


def _head(model: nn.Module, spec: ArchSpec, h: Tensor) -> Tensor:
    for path in spec.head_path:
        try:
            h = model.get_submodule(path)(h)
        except AttributeError:
            pass
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _Tail:
    """The model from block ``b`` on, over the kept inputs of every block."""

    def __init__(self, model: nn.Module, spec: ArchSpec, inputs) -> None:
        self.model, self.spec, self.inputs = model, spec, inputs
        self.blocks = get_blocks(model, spec)

    @torch.no_grad()
    def logprobs(self, b: int) -> list[Tensor]:
        hidden = self.inputs[b][0]
        for j in range(b, len(self.blocks)):
            hidden = [block_output(self.blocks[j](h, **kw))
                      for h, kw in zip(hidden, self.inputs[j][1], strict=True)]
        return [torch.log_softmax(_head(self.model, self.spec, h)[:, :-1], -1) for h in hidden]


def _mean_kl(base: list[tuple[Tensor, Tensor]], lp: list[Tensor]) -> float:
    """Mean KL(base || model) over every position; ``base``: (log-probabilities, probabilities)
    per chunk, the latter computed once for all runs."""
    kl = [kl_divergence(b, q, p).flatten() for (b, p), q in zip(base, lp, strict=True)]
    return float(torch.cat(kl).mean())


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties ranked by order: the values here are continuous)."""
    if len(x) < 2:
        return float("nan")
    rx = torch.tensor(x, dtype=torch.float64).argsort().argsort().double()
    ry = torch.tensor(y, dtype=torch.float64).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


@torch.no_grad()
def measure(model: nn.Module, windows: Tensor, schemes: list[str], chunk: int = 8,
            progress: bool = True, method: str = "rtn", calib: Tensor | None = None) -> dict:
    """Each block Linear's sensitivity at each scheme (see the module docstring): a dict that
    ``choose`` and ``lowbit analyze --json`` use. ``method``: the rounder each candidate is
    rounded with (``rtn``, ``gptq``, ``hqq``: the one the recipe will use, so the measured cost
    is the one it pays); ``calib``: the windows whose Hessians the rounder and the proxy use
    (default: ``windows``, on which the KL is measured)."""
    t0 = time.perf_counter()
    if not schemes:
        raise LowbitError("give at least one candidate scheme")
    for s in schemes:
        if not is_ggml(s):
            get_grid(s)  # unknown names fail before any work
    rounder = STEPS.get(method)
    if rounder is None or rounder.kind != "rounder":
        rounders = sorted(n for n, c in STEPS.items() if c.kind == "rounder")
        raise LowbitError(f"analyze: unknown rounding method {method!r}; one of "
                          f"{', '.join(rounders)}")
    if method != "rtn" and any(is_ggml(s) for s in schemes):
        raise LowbitError("llama.cpp types are measured as llama-quantize rounds them; "
                          f"--method {method} goes with lowbit schemes")
    spec = spec_for(model)
    if spec.moe:
        raise LowbitError("lowbit analyze does not handle mixture-of-experts blocks yet")
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise LowbitError("the model is already quantized: analyze its base model")
    rec = _Recorder(schemes, rounder(), calib is not None)
    run_sequential(model, spec, windows if calib is None else calib, rec, chunk=chunk,
                   progress=progress, sample=None if calib is None else windows)
    tail = _Tail(model, spec, rec.inputs)
    base = [(lp, lp.exp()) for lp in tail.logprobs(0)]
    runs = sum(len(r["schemes"]) for r in rec.layers.values())
    bar = tqdm(total=runs, desc="sensitivity", unit="run", disable=not progress)
    for name, row in rec.layers.items():
        mod = model.get_submodule(name)
        w0 = get_weight(mod, spec).clone()
        try:
            for s, cell in row["schemes"].items():
                if is_ggml(s):
                    wq = round_ggml(w0.float(), s)[0]
                elif (name, s) in rec.rounded:
                    wq = rec.rounded.pop((name, s)).dequantize()
                else:
                    wq = rtn(w0.float(), get_grid(s)).dequantize()
                set_weight(mod, spec, wq)
                cell["kl"] = _mean_kl(base, tail.logprobs(row["block"]))
                bar.update(1)
        finally:
            set_weight(mod, spec, w0)
    bar.close()
    cells = [c for r in rec.layers.values() for c in r["schemes"].values()]
    rho = {"all": spearman([c["kl"] for c in cells], [c["proxy"] for c in cells])}
    for s in schemes:
        sc = [r["schemes"][s] for r in rec.layers.values() if s in r["schemes"]]
        rho[s] = spearman([c["kl"] for c in sc], [c["proxy"] for c in sc])
    return {"format": FORMAT, "version": 1, "schemes": list(schemes), "method": method,
            "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
            "calib_tokens": int((windows if calib is None else calib).numel()),
            "layers": rec.layers, "spearman": rho, "seconds": time.perf_counter() - t0}


def check_sensitivity(sens: dict) -> dict:
    if not isinstance(sens, dict) or sens.get("format") != FORMAT:
        raise LowbitError("not a sensitivity file written by lowbit analyze --json")
    return sens


def read_sensitivity(path: str | Path) -> dict:
    """A ``lowbit analyze --json`` file, checked; a one-line LowbitError when it is not one."""
    try:
        return check_sensitivity(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read --sensitivity {path}: {e}") from None


def budget_bytes(sens: dict, target_bpw: float | None = None,
                 target_bytes: int | None = None) -> int:
    """The byte budget for the measured layers: ``target_bpw`` bits per weight over their
    weights, or ``target_bytes`` of their stored tensors."""
    if (target_bpw is None) == (target_bytes is None):
        raise LowbitError("give one of --target-bpw and --target-size")
    if target_bpw is not None:
        if target_bpw <= 0:
            raise LowbitError(f"--target-bpw must be positive, not {target_bpw}")
        return int(target_bpw * sum(r["numel"] for r in sens["layers"].values()) / 8)
    if target_bytes <= 0:
        raise LowbitError(f"--target-size must be positive, not {target_bytes}")
    return int(target_bytes)


def tied(sens: dict) -> dict:
    """``sens`` with the Linears that read one input (q/k/v, gate/up) as one layer named
    ``a+b+c``: bytes and measured costs summed, the schemes every member takes. vLLM and SGLang
    fuse such Linears into one matrix with one scheme (compressed-tensors refuses differing
    ones), so a checkpoint for them must give the set one scheme. Files measured before the
    ``input`` field was recorded stay as they are."""
    layers = sens["layers"]
    out: dict[str, dict] = {}
    for name, row in layers.items():
        members = [n for n in row.get("input", [name]) if n in layers]
        if name != members[0]:
            continue  # counted with the set's first member
        if len(members) == 1:
            out[name] = row
            continue
        rows = [layers[n] for n in members]
        common = [s for s in row["schemes"] if all(s in r["schemes"] for r in rows)]
        out["+".join(members)] = {
            "block": row.get("block"), "numel": sum(r["numel"] for r in rows),
            "schemes": {s: {k: sum(r["schemes"][s][k] for r in rows)
                            for k in ("bytes", "kl", "proxy") if k in row["schemes"][s]}
                        for s in common}}
    return {**sens, "layers": out}


def choose(sens: dict, budget: int, metric: str = "kl", tie: bool = True) -> dict[str, str]:
    """One scheme per layer with the smallest summed ``metric`` whose stored bytes fit
    ``budget`` (exact: dynamic programming over bytes in units of their gcd); with ``tie``,
    one scheme for the Linears that read one input (``tied``)."""
    if tie:
        return {n: s for names, s in choose(tied(sens), budget, metric, False).items()
                for n in names.split("+")}
    names = list(sens["layers"])
    options = [[(s, c["bytes"], c[metric]) for s, c in sens["layers"][n]["schemes"].items()]
               for n in names]
    if any(not o for o in options):
        bad = next(n for n, o in zip(names, options, strict=True) if not o)
        raise LowbitError(f"no candidate scheme holds {bad}")
    least = sum(min(b for _, b, _ in o) for o in options)
    most = sum(max(b for _, b, _ in o) for o in options)
    if budget < least:
        raise LowbitError(f"the budget ({budget:,} bytes) is below the smallest choice "
                          f"({least:,} bytes: every layer at its smallest scheme)")
    if budget >= most:  # every layer at its best
        return {n: min(o, key=lambda t: t[2])[0] for n, o in zip(names, options, strict=True)}
    unit = reduce(math.gcd, (b for o in options for _, b, _ in o))
    cap = budget // unit
    if cap * len(names) > 2e9:
        raise LowbitError("the budget is too fine-grained for the exact allocation "
                          f"({cap:,} units of {unit} bytes x {len(names)} layers)")
    inf = float("inf")
    best = np.zeros(cap + 1)  # best[c]: least summed metric with at most c units
    pick = np.zeros((len(names), cap + 1), dtype=np.int8)
    for i, opts in enumerate(options):
        new = np.full(cap + 1, inf)
        for k, (_, b, v) in enumerate(opts):
            u = b // unit
            if u > cap:
                continue  # this option alone is over the budget
            cand = np.full(cap + 1, inf)
            cand[u:] = best[: cap + 1 - u] + v
            better = cand < new
            new[better] = cand[better]
            pick[i][better] = k
        best = new
    if not math.isfinite(best[cap]):
        raise LowbitError("no choice fits the budget")
    out, c = {}, cap
    for i in range(len(names) - 1, -1, -1):
        s, b, _ = options[i][pick[i][c]]
        out[names[i]] = s
        c -= b // unit
    return out


def ggml_allocation(sens: dict, budget: int) -> dict[str, str]:
    """llama.cpp block types for the measured layers (full module name -> the type stored, after
    llama.cpp's fallback) with the least summed KL in ``budget`` bytes, over the sensitivity's
    llama.cpp candidates (``lowbit analyze --schemes Q3_K,Q4_K,...``). Untied: llama.cpp keeps
    q/k/v and gate/up as separate tensors."""
    layers = {n: {**r, "schemes": {s: c for s, c in r["schemes"].items() if is_ggml(s)}}
              for n, r in sens["layers"].items()}
    if not any(r["schemes"] for r in layers.values()):
        raise LowbitError("the sensitivity file has no llama.cpp types among its candidates: "
                          "measure them with lowbit analyze --schemes Q3_K,Q4_K,Q5_K,Q6_K,Q8_0")
    only = {**sens, "layers": layers}
    choice = choose(only, budget, tie=False)
    return {n: layers[n]["schemes"][s]["type"] for n, s in choice.items()}


def tensor_type_file(types: dict[str, str]) -> str:
    """``types`` (llama.cpp tensor name -> ggml type) as llama-quantize's ``--tensor-type-file``:
    one ``pattern=type`` line per tensor, the pattern its name anchored and escaped (llama.cpp
    matches patterns as regular expressions, the first match wins; the file has no comments)."""
    return "".join(f"^{re.escape(n)}$={t.lower()}\n" for n, t in types.items())


def budget_recipe(recipe: Recipe, choice: dict[str, str]) -> Recipe:
    """``recipe`` with its rounder's scheme the most frequent choice and the other layers'
    choices as overrides (before the recipe's own)."""
    rounders = [i for i, st in enumerate(recipe.steps) if st.kind == "rounder"]
    if len(rounders) != 1:
        raise LowbitError("--target-bpw / --target-size need a recipe with exactly one rounding "
                          "step (rtn, gptq, hqq)")
    i = rounders[0]
    step = recipe.steps[i]
    if not choice:
        return recipe
    main = Counter(choice.values()).most_common(1)[0][0]
    overrides = tuple((n, s) for n, s in choice.items() if s != main) + tuple(step.overrides)
    steps = list(recipe.steps)
    steps[i] = dataclasses.replace(step, scheme=main, overrides=overrides)
    return dataclasses.replace(recipe, steps=tuple(steps))


def summary(sens: dict, choice: dict[str, str]) -> dict:
    """What a choice costs and predicts: bytes, bits per weight, summed KL, schemes used."""
    layers = sens["layers"]
    nbytes = sum(layers[n]["schemes"][s]["bytes"] for n, s in choice.items())
    numel = sum(layers[n]["numel"] for n in choice)
    return {"bytes": nbytes, "bits_per_weight": 8 * nbytes / numel,
            "predicted_kl": sum(layers[n]["schemes"][s]["kl"] for n, s in choice.items()),
            "schemes": dict(Counter(choice.values()).most_common())}

