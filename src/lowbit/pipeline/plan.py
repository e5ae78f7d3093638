"""Running a recipe on a model: which step owns each layer, then one pass of the driver.

``make_plan`` checks, in seconds and before any long run, that the family is known, that the
steps come in order (transforms, then rounders and replacers), that no layer has two owners,
that every owned layer fits its grid, and whether calibration windows are needed at all.
``execute`` then runs the transforms, rounders and replacers of every block through the one
sequential driver (or, when no step needs data, layer by layer without any forward pass), and
finally ``lm_head`` when a step targets it. Steps are used through their protocol only
(``lowbit.methods.base``): this module does not know any particular method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.arch import ArchSpec, block_linears, get_blocks, get_weight, spec_for
from lowbit.errors import LowbitError
from lowbit.formats.grid_base import all_finite
from lowbit.pipeline.checkpoint import (
    RunCheckpoint,
    lowbit_version,
    model_digest,
    tensor_digest,
)
from lowbit.pipeline.dist import min_over_ranks, round_shared, share, sync_stats, world
from lowbit.pipeline.driver import MOE_MIN_TOKENS, BlockContext, Stream, run_sequential
from lowbit.pipeline.release import bound_heap, page_out, release, trim
from lowbit.pipeline.stats import InputStats
from lowbit.runtime.experts import unfuse_experts
from lowbit.runtime.qlinear import QLinear

HEAD = "lm_head"
ORDER = {"transform": 0, "pruner": 1, "rounder": 2, "replacer": 2, "cache": 3}


@dataclass
class Layer:
    full: str  # full module name
    block: int | None  # None for lm_head
    local: str  # name inside the block (or "lm_head")
    step: object  # the rounder or replacer that owns it
    grid: object | None = None  # rounders: the grid it is rounded onto


@dataclass
class Plan:
    spec: ArchSpec
    steps: list
    layers: dict[str, Layer]  # full name -> owner
    transforms: list
    pruned: dict[str, object] = field(default_factory=dict)  # full name -> its pruner

    @property
    def needs_data(self) -> bool:
        if any(t.needs_data() for t in self.transforms):
            return True
        if self.cache is not None and self.cache.needs_data():
            return True
        if any(p.needs_data() for p in self.pruned.values()):
            return True
        return any(self.wants(la) or (la.step.kind == "replacer" and la.step.needs_data())
                   or getattr(la.step, "block_wise", False)
                   or getattr(la.step, "model_wise", False) for la in self.layers.values())

    @property
    def model_wise(self) -> bool:
        """Whether whole-model rounders (``methods.qat``) own every layer: the blocks then
        store what they learned, with no calibration pass (nor saved block inputs) of their
        own."""
        return bool(self.layers) and all(getattr(la.step, "model_wise", False)
                                         for la in self.layers.values())

    @property
    def cache(self):
        """The recipe's KV-cache step, if any (``lowbit.methods.kvcache``)."""
        return next((s for s in self.steps if s.kind == "cache"), None)

    def wants(self, layer: Layer) -> frozenset[str]:
        if layer.step.kind == "rounder":
            return layer.step.wants(layer.grid)
        return layer.step.wants()

    def grid_of(self, full: str):
        layer = self.layers.get(full)
        return None if layer is None else layer.grid

    def in_block(self, bi: int) -> list[Layer]:
        return [la for la in self.layers.values() if la.block == bi]


class QuantizedLayers(Mapping):
    """The quantized layers by full module name. Rounded Linears are held as the model's
    ``QLinear`` (packed codes) and read as their ``GridWeight`` (decoded on each access, so the
    unpacked codes of all layers never sit in memory at once); replaced Linears are the
    runtime modules themselves. ``modules()`` gives the runtime modules without decoding."""

    def __init__(self) -> None:
        self._items: dict[str, object] = {}

    def __getitem__(self, name: str):
        item = self._items[name]
        if not isinstance(item, QLinear):
            return item
        gw = item.grid_weight()
        # a finished block's stored tensors are maps of its checkpoint file: once decoded,
        # their pages go back (reading every layer to save would otherwise keep all of them
        # resident: +1.4 GiB on a 28-block 3B model)
        page_out(list(item.to_tensors().values()))
        return gw

    def __iter__(self):
        return iter(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __setitem__(self, name: str, item) -> None:
        self._items[name] = item

    def modules(self) -> Mapping[str, object]:
        """Each layer as held: ``QLinear``, runtime modules, or (until its block ends) the
        ``GridWeight`` just rounded (a read-only view)."""
        return MappingProxyType(self._items)


@dataclass
class Result:
    """What ``execute`` produced: the quantized weights (``GridWeight``) and runtime modules by
    full module name, one log row per layer (and per transform group), the statistics steps
    chose to keep, and the time taken."""

    steps: list
    weights: QuantizedLayers = field(default_factory=QuantizedLayers)
    rows: list[dict] = field(default_factory=list)
    stats: dict[str, InputStats] = field(default_factory=dict)
    seconds: float = 0.0
    calibration_tokens: int = 0
    recipe: object = None  # the Recipe that ran (set by lowbit.api.quantize)
    kv_cache: dict | None = None  # the KV-cache record (format, float8 scales) of a kv step

    def bits_per_weight(self) -> float:
        n = bits = 0.0
        for w in self.weights.modules().values():
            numel = w.shape[0] * w.shape[1]
            n += numel
            bits += w.bits_per_weight() * numel
        return bits / max(n, 1)

    def storage_bytes(self) -> int:
        return sum(w.storage_bytes() for w in self.weights.modules().values())


def candidates(model: nn.Module, spec: ArchSpec) -> dict[str, tuple[int | None, str, nn.Module]]:
    """Every quantizable layer: the blocks' Linears (from the family table) and lm_head."""
    out: dict[str, tuple[int | None, str, nn.Module]] = {}
    for bi, block in enumerate(get_blocks(model, spec)):
        for local, mod in block_linears(block, spec).items():
            out[f"{spec.blocks}.{bi}.{local}"] = (bi, local, mod)
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        out[HEAD] = (None, HEAD, head)
    return out


def _shape(mod: nn.Module, spec: ArchSpec, local: str) -> tuple[int, int]:
    if local == HEAD:
        return tuple(mod.weight.shape)  # type: ignore[return-value]
    return tuple(get_weight(mod, spec).shape)  # type: ignore[return-value]


def make_plan(model: nn.Module, steps: list) -> Plan:
    """Assign every layer to at most one rounder or replacer, and check shapes and order."""
    if not steps:
        raise LowbitError("the recipe has no steps")
    bound_heap()  # transients go back to the system when freed (lowbit.pipeline.release)
    spec = spec_for(model)
    unfuse_experts(model)  # MoE: one Linear per expert, each a layer of its own
    for a, b in zip(steps, steps[1:], strict=False):
        if ORDER[a.kind] > ORDER[b.kind]:
            raise LowbitError(f"recipe order: {b.step} ({b.kind}) must come before "
                              f"{a.step} ({a.kind}); transforms run first")
    if any(s.kind == "pruner" for s in steps) and world()[1] > 1:
        raise LowbitError("pruning runs in one process; run it without --nproc")
    caches = [s for s in steps if s.kind == "cache"]
    if len(caches) > 1:
        raise LowbitError("a recipe has at most one kv step")
    owners = [s for s in steps if s.kind in ("rounder", "replacer")]
    pruners = [s for s in steps if s.kind == "pruner"]
    layers: dict[str, Layer] = {}
    pruned: dict[str, object] = {}
    for full, (bi, local, mod) in candidates(model, spec).items():
        mine = [s for s in owners if s.applies(full)]
        if len(mine) > 1:
            raise LowbitError(f"{full} is targeted by {mine[0].step} and {mine[1].step}; give "
                              "each layer one rounder or replacer (use ignore)")
        if prn := [s for s in pruners if s.applies(full)]:
            pruned[full] = _pruner_for(full, prn, mine, mod, spec, local)
        if not mine:
            continue
        step = mine[0]
        w = mod.weight
        if not all_finite(w):
            raise LowbitError(f"{full}: the weight holds {int(torch.isnan(w).sum())} NaN and "
                              f"{int(torch.isinf(w).sum())} inf values; only finite weights can "
                              "be quantized")
        page_out([w.data])  # the check read it all: give back what a checkpoint map holds
        grid = None
        if step.kind == "rounder":
            grid = step.grid_for(full)
            try:
                grid.check(*_shape(mod, spec, local))
            except LowbitError as e:
                raise LowbitError(f"{full}: {e}") from None
        layers[full] = Layer(full, bi, local, step, grid)
    if not layers and not pruned and not any(getattr(s, "reshapes", False) for s in steps):
        raise LowbitError("the recipe's targets and ignore lists select no layer of this "
                          f"{spec.family} model")
    transforms = [s for s in steps if s.kind == "transform" and s.needs_data()]
    if spec.moe is not None and transforms:
        raise LowbitError(f"{transforms[0].step} does not support mixture-of-experts models "
                          f"({spec.family}) yet; use a rounder alone (rtn, gptq ...)")
    if HEAD in layers and spec.conv1d:
        raise LowbitError("lm_head of GPT-2 (Conv1D blocks) cannot be quantized yet")
    return Plan(spec, list(steps), layers, [s for s in steps if s.kind == "transform"],
                pruned)


def _pruner_for(full: str, prn: list, owners: list, mod: nn.Module, spec: ArchSpec,
                local: str):
    """The one pruner of a layer, checked against the step that owns it."""
    if len(prn) > 1:
        raise LowbitError(f"{full} is pruned by two steps; give each layer one pruner")
    if full == HEAD:
        raise LowbitError("lm_head is not pruned: add it to the pruner's ignore list")
    if owners and not getattr(owners[0], "keeps_zeros", False):
        raise LowbitError(f"{full}: {owners[0].step} cannot keep pruned weights at zero; prune "
                          "before rtn or gptq (or alone, --method none)")
    try:
        prn[0].check_shape(*_shape(mod, spec, local))
    except LowbitError as e:
        raise LowbitError(f"{full}: {e}") from None
    return prn[0]


class _Executor:
    """The driver's visitor: runs the plan's steps on each block."""

    def __init__(self, model: nn.Module, plan: Plan, res: Result,
                 on_row: Callable[[dict], None] | None, n_tokens: int) -> None:
        self.model, self.plan, self.res = model, plan, res
        self.on_row, self.n_tokens = on_row, n_tokens
        self.pending: list[tuple[str, object, nn.Module, dict]] = []
        self.rounded: list[str] = []  # rounded in this block, swapped for QLinear at its end
        self.learned: dict[str, tuple] = {}  # block-wise rounders' results, by full name
        self.prune_rows: dict[str, dict] = {}  # pruned before rounding: merged into its row

    def emit(self, row: dict) -> None:
        self.res.rows.append(row)
        if self.on_row:
            self.on_row(row)

    def transform(self, ctx: BlockContext) -> None:
        for t in self.plan.transforms:
            for row in t.transform(ctx, self.plan):
                self.emit({"block": ctx.index, "step": t.step} | row)
        self.res.stats |= ctx.kept
        # block-wise rounders (methods.autoround) learn the whole block at its start, on the
        # transformed weights; each group then takes its result when the driver reaches it
        mine = [la for la in self.plan.in_block(ctx.index)
                if la.step.kind == "rounder" and getattr(la.step, "block_wise", False)]
        for step in {id(la.step): la.step for la in mine}.values():
            own = [la for la in mine if la.step is step]
            self.learned |= step.round_block(ctx, {la.full: la.local for la in own},
                                             {la.full: la.grid for la in own})

    def wants(self, ctx: BlockContext, group) -> frozenset[str] | None:
        mine = [self.plan.layers.get(ctx.full(n)) for n in group]
        mine = [la for la in mine if la is not None and la.step.kind == "rounder"]
        prn = [p for n in group if (p := self.plan.pruned.get(ctx.full(n))) is not None]
        if not mine and not prn:
            return None
        return frozenset().union(*(self.plan.wants(la) for la in mine),
                                 *(p.wants() for p in prn))

    def round(self, ctx: BlockContext, group, stats: InputStats) -> None:
        mods = {n: ctx.linears[n] for n in group}
        self.round_modules(ctx.index, {ctx.full(n): m for n, m in mods.items()}, stats,
                           ctx.spec.conv1d)

    def prune(self, bi, mods: dict[str, nn.Module], stats, conv1d: bool) -> dict[str, object]:
        """Prune the pruned Linears among ``mods`` in place; full name -> keep mask, or the
        pattern for a rounder that prunes in its own sweep (sparsegpt + gptq)."""
        sparse: dict[str, object] = {}
        by_step: dict[int, list[str]] = {}
        for full in mods:
            prn = self.plan.pruned.get(full)
            if prn is None:
                continue
            la = self.plan.layers.get(full)
            if la is not None and prn.joint_with(la.step):
                sp = sparse[full] = prn.pattern_for(full)
                self.prune_rows[full] = {"pruner": prn.method, "sparsity": str(sp),
                                         "pruned": round(sp.ratio, 4), "joint": True}
            else:
                by_step.setdefault(id(prn), []).append(full)
        for fulls in by_step.values():
            prn = self.plan.pruned[fulls[0]]
            done = prn.prune_layers({f: _weight(mods[f], conv1d) for f in fulls}, stats)
            for full, (new, keep, info) in done.items():
                _set(mods[full], new, conv1d)
                sparse[full] = keep
                if full in self.plan.layers:
                    self.prune_rows[full] = info
                else:  # pruned alone: the weight stays in full precision
                    self.emit({"block": bi, "name": full, "shape": list(new.shape),
                               "tokens": 0 if stats is None else stats.n, "step": prn.step}
                              | info)
        return sparse

    def round_modules(self, bi, mods: dict[str, nn.Module], stats, conv1d: bool) -> None:
        sparse = self.prune(bi, mods, stats, conv1d) if self.plan.pruned else {}
        by_step: dict[int, list[str]] = {}
        for full in mods:
            la = self.plan.layers.get(full)
            if la is not None and la.step.kind == "rounder":
                by_step.setdefault(id(la.step), []).append(full)
        for fulls in by_step.values():
            step = self.plan.layers[fulls[0]].step
            weights = {f: _weight(mods[f], conv1d) for f in fulls}
            grids = {f: self.plan.layers[f].grid for f in fulls}
            if all(f in self.learned for f in fulls):
                done = {f: self.learned.pop(f) for f in fulls}
            elif any(f in sparse for f in fulls):  # one process (make_plan)
                done = step.round_layers(weights, grids, stats,
                                         sparse={f: sparse[f] for f in fulls if f in sparse})
            else:  # several processes (lowbit.pipeline.dist): rows or Linears shared, exchanged
                done = round_shared(lambda w, g, step=step: step.round_layers(w, g, stats),
                                    weights, grids, step.row_separable)
            for full in fulls:
                gw, info = done[full]
                if full in self.prune_rows:
                    info = info | self.prune_rows.pop(full)
                _set(mods[full], gw.dequantize(), conv1d)
                self.res.weights[full] = gw
                self.rounded.append(full)
                self.emit({"block": bi, "name": full, "shape": list(gw.shape),
                           "tokens": 0 if stats is None else stats.n, "step": step.step,
                           "scheme": gw.grid.name} | info
                          | ({} if stats is None else stats.info))

    def replace(self, ctx: BlockContext) -> bool:
        mine = [la for la in self.plan.in_block(ctx.index) if la.step.kind == "replacer"]
        for step in {id(la.step): la.step for la in mine}.values():
            names = [la.local for la in mine if la.step is step]
            stats = ctx.observe(names, step.wants())[0] if step.wants() else {}
            for n in names:
                self.replace_module(ctx.block, n, ctx.full(n), step, stats.get(n), ctx.index,
                                    ctx.spec.conv1d)
        return bool(mine)

    def replace_module(self, parent: nn.Module, local: str, full: str, step, stats, bi,
                       conv1d: bool) -> None:
        mod = parent.get_submodule(local)
        bias = getattr(mod, "bias", None)
        module, info = step.make(_weight(mod, conv1d), None if bias is None else bias.data,
                                 stats)
        owner, _, child = local.rpartition(".")
        setattr(parent.get_submodule(owner) if owner else parent, child, module)
        release([mod.weight.data])
        self.res.weights[full] = module
        row = {"block": bi, "name": full, "shape": [module.out_features, module.in_features],
               "tokens": 0 if stats is None else stats.n, "step": step.step} | info
        self.pending.append((full, step, module, row))

    def finish(self, ctx: BlockContext | None) -> None:
        for _full, step, module, row in self.pending:
            self.emit(row | step.finish(module))
        self.pending.clear()
        self.swap()

    def swap(self) -> None:
        """The Linears rounded since the last call become ``QLinear``s holding packed codes: the
        model computes the same, and its float weights are freed block by block (peak memory
        stays near the model's own size)."""
        done = []
        for full in self.rounded:
            gw = self.res.weights.modules()[full]
            owner, _, child = full.rpartition(".")
            parent = self.model.get_submodule(owner) if owner else self.model
            old = getattr(parent, child)
            bias = getattr(old, "bias", None)
            q = QLinear(gw, None if bias is None else bias.data)
            q.in_rotation = getattr(old, "in_rotation", None)  # rotated online (methods.rotate)
            q.out_rotation = getattr(old, "out_rotation", None)
            setattr(parent, child, q)
            self.res.weights[full] = q
            done.append(old.weight.data)
        release(done)
        trim()
        self.rounded.clear()


def _weight(mod: nn.Module, conv1d: bool) -> Tensor:
    return mod.weight.data.T if conv1d else mod.weight.data


def _set(mod: nn.Module, w: Tensor, conv1d: bool) -> None:
    target = mod.weight.data
    target.copy_((w.T if conv1d else w).to(target.dtype))


def untie_head(model: nn.Module) -> None:
    """Give lm_head its own weight when it shares the embeddings' (it is about to change)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


@torch.no_grad()
def execute(
    model: nn.Module,
    plan: Plan,
    calib: Tensor | None,
    chunk: int = 8,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    moe_min_tokens: float = MOE_MIN_TOKENS,
    checkpoint: RunCheckpoint | None = None,
) -> Result:
    """Quantize ``model`` in place as planned: every quantized Linear becomes a runtime module
    (rounded ones a ``QLinear`` when their block ends), so the model evaluates as the
    quantized model and holds what a reload from the saved folder holds. ``moe_min_tokens``:
    routed tokens per input channel from which an expert's own statistics are used alone
    (``lowbit.pipeline.driver``). ``checkpoint``: each finished block is written there, and a
    run with the same fingerprint goes on from the first unfinished one
    (``lowbit.pipeline.checkpoint``)."""
    if plan.needs_data and calib is None:
        names = sorted({la.step.step for la in plan.layers.values()
                        if plan.wants(la) or la.step.needs_data()}
                       | {t.step for t in plan.transforms}
                       | {p.step for p in plan.pruned.values() if p.needs_data()})
        raise LowbitError(f"{', '.join(names)} needs calibration windows")
    bound_heap()
    res = Result(plan.steps)
    t0 = time.perf_counter()
    spec = plan.spec
    ex = _Executor(model, plan, res, on_row, 0 if calib is None else calib.numel())
    for t in plan.transforms:  # whole-model transforms (rotations) before the first block
        if hasattr(t, "check_plan"):
            t.check_plan(model, plan)
    for t in plan.transforms:
        if hasattr(t, "transform_model"):
            for row in t.transform_model(model, spec):
                ex.emit({"step": t.step} | row)
    for p in {id(p): p for p in plan.pruned.values()}.values():  # OWL's pass on the dense model
        for row in p.prepare(model, plan, calib, progress):
            ex.emit({"step": p.step} | row)
    blocks = get_blocks(model, spec)
    start, inputs, sources = 0, (None, None), []
    if checkpoint is not None:
        start = _resume(model, plan, calib, chunk, moe_min_tokens, checkpoint, res)
        inputs = checkpoint.inputs()
        if start and plan.needs_data and not plan.model_wise and inputs[0] is None:
            raise LowbitError(f"checkpoint {checkpoint.folder} lacks the inputs of block "
                              f"{start}; run with --no-resume to start over")
        sources = list(checkpoint.extra.get("sources", []))
    _train_model_wise(model, plan, ex, calib, checkpoint, progress)
    done = len(res.rows)

    def on_block(bi: int, block: nn.Module, main=None, samp=None, sources=None) -> None:
        nonlocal done
        if checkpoint is not None:
            kept = {n: st for n, st in res.stats.items()
                    if n.startswith(f"{spec.blocks}.{bi}.")}
            checkpoint.save_block(bi, block, res.rows[done:], kept,
                                  None if main is None else main.hidden,
                                  None if samp is None else samp.hidden,
                                  {"sources": list(sources or [])})
            checkpoint.offload(bi, block, f"{spec.blocks}.{bi}", res.weights)
        done = len(res.rows)

    if plan.needs_data:
        res.calibration_tokens = int(calib.numel())
    if plan.needs_data and not plan.model_wise:
        samples = [t.sample(calib) for t in plan.transforms]  # every rank: the whole sample
        sample = next((s for s in samples if s is not None), None)
        last = run_sequential(
            model, spec, share(calib), ex, chunk=chunk, progress=progress, sample=sample,
            moe_min_tokens=moe_min_tokens, start=start, inputs=inputs, sources=sources,
            on_block=lambda ctx, main, samp, src: on_block(ctx.index, ctx.block, main, samp,
                                                           src))
    else:
        last = None
        bar = tqdm(total=len(blocks), initial=start, desc="blocks", unit="block",
                   disable=not progress)
        for bi, block in enumerate(blocks):
            if bi < start:
                continue
            mods = {f"{spec.blocks}.{bi}.{n}": m for n, m in block_linears(block, spec).items()}
            ex.round_modules(bi, mods, None, spec.conv1d)
            for la in plan.in_block(bi):
                if la.step.kind == "replacer":
                    ex.replace_module(block, la.local, la.full, la.step, None, bi, spec.conv1d)
            ex.finish(None)
            on_block(bi, block)
            bar.update(1)
        bar.close()
    if HEAD in plan.layers:
        _head(model, plan, ex, last)
    if plan.cache is not None:  # on the quantized model: the keys it will cache
        res.kv_cache = plan.cache.record(model, calib)
        ex.emit({"step": plan.cache.step, "layer": "kv_cache", "format": res.kv_cache["format"]})
    res.seconds = time.perf_counter() - t0
    return res


def _train_model_wise(model: nn.Module, plan: Plan, ex: _Executor, calib: Tensor | None,
                      checkpoint: RunCheckpoint | None, progress: bool) -> None:
    """Whole-model rounders (``methods.qat``) learn their layers before the first block; the
    blocks then store what they learned."""
    steps = {id(la.step): la.step for la in plan.layers.values()
             if getattr(la.step, "model_wise", False)}
    if not steps:
        return
    per_block = [t.step for t in plan.transforms if not hasattr(t, "transform_model")]
    if per_block:
        raise LowbitError(f"{', '.join(s.step for s in steps.values())} trains the whole model "
                          f"before the blocks run; {', '.join(per_block)} changes each block "
                          "as it runs, after that training: leave it out")
    for step in steps.values():
        own = {la.full: la.grid for la in plan.layers.values()
               if la.step is step and la.full not in ex.res.weights}
        if own:
            ex.learned |= step.train_model(model, plan.spec, own, calib, checkpoint, progress)


def _resume(model: nn.Module, plan: Plan, calib: Tensor | None, chunk: int,
            moe_min_tokens: float, checkpoint: RunCheckpoint, res: Result) -> int:
    """Compare the run's fingerprint with the checkpoint's and put its finished blocks back
    into ``model``; the number of finished blocks."""
    fp = {
        "model weights": model_digest(model),
        "steps": repr(plan.steps),
        "calibration windows": "none" if calib is None else tensor_digest(calib),
        "chunk": str(chunk),
        "moe_min_tokens": repr(moe_min_tokens),
        "lowbit": lowbit_version(),
        "torch": torch.__version__,
    }
    rank, size = world()
    if size > 1:
        fp["process"] = f"{rank} of {size}"
    start = min_over_ranks(checkpoint.begin(fp))
    checkpoint.rewind(start)
    spec = plan.spec
    blocks = get_blocks(model, spec)
    if start > len(blocks):
        raise LowbitError(f"checkpoint {checkpoint.folder} records {start} finished blocks; "
                          f"the model has {len(blocks)}")
    if start:
        checkpoint.note(f"resuming from {checkpoint.folder}: blocks 0-{start - 1} of "
                        f"{len(blocks)} are finished")
    for bi in range(start):
        for t in plan.transforms:  # finished blocks of another shape (methods.structured)
            if hasattr(t, "shape_block"):
                t.shape_block(blocks[bi], spec)
        checkpoint.restore_block(bi, blocks[bi], f"{spec.blocks}.{bi}", res.weights,
                                 res.stats)
    res.rows.extend(checkpoint.rows)
    return start


def _head(model: nn.Module, plan: Plan, ex: _Executor, last: Stream | None) -> None:
    """lm_head, from the last block's outputs through the final norm (``head_path``)."""
    la = plan.layers[HEAD]
    untie_head(model)
    head = model.get_output_embeddings()
    stats = None
    if last is not None:
        stats = InputStats(head.in_features, plan.wants(la))
        for h in last.hidden:
            for path in plan.spec.head_path:
                mod = _optional(model, path)
                if mod is not None:
                    h = mod(h)
            stats.add(h)
        sync_stats(stats)
    if la.step.kind == "rounder":
        ex.round_modules(None, {HEAD: head}, stats, False)
        ex.swap()
    else:
        ex.replace_module(model, HEAD, HEAD, la.step, stats, None, False)
        ex.finish(None)


def _optional(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
