"""Recipes: an ordered list of steps (``lowbit.methods``) plus the calibration they ask for,
written in Python, YAML or JSON, recorded in every output's ``lowbit.json`` under ``recipe``,
and re-runnable from there.

YAML form::

    steps:
      - awq: {}
      - gptq:
          scheme: w4g64
          act_order: true
          overrides:
            're:.*layers\\.0\\..*down_proj': w8
    calibration: {source: builtin, samples: 128, seq_len: 512}

A step is ``{name: {options}}``, ``{step: name, options...}`` or just ``name``. ``--method`` /
``--scheme`` on the command line are shorthand for one- or two-step recipes (``shorthand``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lowbit.methods  # noqa: F401  (registers every step)
from lowbit.errors import LowbitError
from lowbit.formats.presets import preset
from lowbit.methods.base import STEPS, Step

CALIB_KEYS = {"source": str, "samples": int, "seq_len": int, "offset": int}

# --method -> the steps it stands for (the scheme goes to the rounder, or W8A8): every step
# that works alone under its own name, and the usual pairs
METHODS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name, cls in STEPS.items() if cls.kind in ("rounder", "replacer")},
    "awq": ("awq", "rtn"),
    "awq+gptq": ("awq", "gptq"),
    "smoothquant": ("smoothquant", "w8a8"),
    "smoothquant+gptq": ("smoothquant", "gptq"),  # W4A8 / W4A4 schemes (w4g64a8) after smoothing
}


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    calibration: dict = field(default_factory=dict)  # requested source/samples/seq_len/offset

    def __post_init__(self) -> None:
        if not self.steps:
            raise LowbitError("a recipe needs at least one step")
        for k, v in self.calibration.items():
            if k not in CALIB_KEYS:
                raise LowbitError(f"recipe calibration has no key {k!r}; keys: "
                                  f"{', '.join(CALIB_KEYS)}")
            if not isinstance(v, CALIB_KEYS[k]) or isinstance(v, bool):
                raise LowbitError(f"recipe calibration {k} must be a {CALIB_KEYS[k].__name__}, "
                                  f"not {v!r}")

    @property
    def name(self) -> str:
        """A short label: the steps joined by '+' (``awq+gptq``)."""
        return "+".join(s.step for s in self.steps)

    @property
    def scheme(self) -> str | None:
        """The main scheme: the first rounder's (or W8A8's) ``scheme``, if any."""
        return next((s.scheme for s in self.steps if hasattr(s, "scheme")), None)

    def needs_data(self) -> bool:
        return any(s.needs_data() for s in self.steps)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"steps": [s.to_dict() for s in self.steps]}
        if self.calibration:
            out["calibration"] = dict(self.calibration)
        return out


def step_from_data(item: Any) -> Step:
    """One step from its data form (see the module docstring)."""
    if isinstance(item, Step):
        return item
    if isinstance(item, str):
        name, opts = item, {}
    elif isinstance(item, dict) and "step" in item:
        name, opts = item["step"], {k: v for k, v in item.items() if k != "step"}
    elif isinstance(item, dict) and len(item) == 1:
        name, opts = next(iter(item.items()))
        opts = {} if opts is None else opts
    else:
        raise LowbitError(f"a recipe step is a name, {{name: {{options}}}} or {{step: name, ...}}; "
                          f"got {item!r}")
    if name not in STEPS:
        raise LowbitError(f"unknown step {name!r}; known: {', '.join(sorted(STEPS))}")
    if not isinstance(opts, dict):
        raise LowbitError(f"options of step {name!r} must be a mapping, not {opts!r}")
    return STEPS[name].from_dict(opts)


def recipe_from_data(data: Any) -> Recipe:
    """A Recipe from a list of steps, a ``{steps, calibration}`` mapping, or a lowbit.json."""
    if isinstance(data, Recipe):
        return data
    from lowbit.io.native import FORMAT, SERVING_RECORDS

    if isinstance(data, dict) and data.get("format") in (FORMAT, *SERVING_RECORDS):
        if "recipe" not in data:
            raise LowbitError("this lowbit.json records no recipe (written by an older lowbit); "
                              "pass --method/--scheme")
        data = data["recipe"]
    calibration: dict = {}
    if isinstance(data, dict):
        bad = set(data) - {"steps", "calibration"}
        if bad:
            raise LowbitError(f"a recipe has the keys steps and calibration, not "
                              f"{', '.join(sorted(bad))}")
        calibration = data.get("calibration") or {}
        if not isinstance(calibration, dict):
            raise LowbitError(f"recipe calibration must be a mapping, not {calibration!r}")
        data = data.get("steps")
    if not isinstance(data, list):
        raise LowbitError("a recipe needs a list of steps")
    return Recipe(tuple(step_from_data(s) for s in data), calibration)


def load_recipe(path: str | Path) -> Recipe:
    """A recipe from a YAML or JSON file (a lowbit.json re-runs the recipe it records)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise LowbitError(f"cannot read recipe {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LowbitError(f"recipe {p} is not UTF-8 text") from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LowbitError(f"recipe {p}: not JSON ({e.msg} at line {e.lineno})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LowbitError(f"recipe {p}: not YAML ({str(e).splitlines()[0]})") from None
    try:
        return recipe_from_data(data)
    except LowbitError as e:
        raise LowbitError(f"recipe {p}: {e}") from None


def shorthand(method: str | None, scheme: str | None = None, **options: Any) -> Recipe:
    """The recipe ``--method M --scheme S`` stands for. ``options`` (CLI flags a user gave:
    act_order, damp, alpha, threshold, kernel ...) go to the steps that take them; one that no
    step of the method takes is refused. Without a method: GPTQ, or ``w8a8`` for a preset that
    quantizes activations (``--scheme W8A8`` / ``FP8_DYNAMIC`` alone)."""
    if method is None:
        p = preset(scheme.strip()) if scheme else None
        method = p.method if p is not None and p.method else "gptq"
    if method not in METHODS:
        raise LowbitError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    names = METHODS[method]
    classes = [STEPS[n] for n in names]
    for opt in options:
        if not any(opt in c.options() for c in classes):
            takers = sorted({m for m, ns in METHODS.items() for n in ns
                             if opt in STEPS[n].options()})
            flag = "--" + opt.replace("_", "-")
            raise LowbitError(f"{flag} is for {', '.join(takers)}; {method} does not take it")
    steps = []
    for c in classes:
        kw = {k: v for k, v in options.items() if k in c.options()}
        if scheme is not None and "scheme" in c.options():
            kw["scheme"] = scheme
        elif scheme is not None and method == "llm-int8":
            raise LowbitError("llm-int8 has no --scheme (int8 weights, mixed activations)")
        steps.append(c(**kw))
    return Recipe(tuple(steps))


def rotated(recipe: Recipe, seed: int = 0, online: bool = False, incoherent: bool = False,
            fused: bool = True) -> Recipe:
    """``recipe`` with a ``rotate`` step first: the fused rotations R1 and R2 (``fused``), R4
    at run time (``online``), incoherence processing of every block Linear (``incoherent``)."""
    if any(s.step == "rotate" for s in recipe.steps):
        raise LowbitError("the recipe rotates already; drop --rotate")
    step = STEPS["rotate"](r1=fused, r2=fused, online=online, incoherent=incoherent, seed=seed)
    return Recipe((step, *recipe.steps), recipe.calibration)


def pruned(recipe: Recipe | None, method: str, sparsity: str, owl: bool = False) -> Recipe:
    """``recipe`` with a ``prune`` step after its transforms (before its rounder), or the
    prune step alone for None (``--method none``: pruned weights stay in full precision);
    ``owl``: OWL's ratio per block."""
    step = STEPS["prune"](method=method, sparsity=sparsity, owl=owl)
    if recipe is None:
        return Recipe((step,))
    if any(s.kind == "pruner" for s in recipe.steps):
        raise LowbitError("the recipe prunes already; drop --prune")
    i = next((k for k, s in enumerate(recipe.steps) if s.kind != "transform"),
             len(recipe.steps))
    return Recipe((*recipe.steps[:i], step, *recipe.steps[i:]), recipe.calibration)


def shrunk(recipe: Recipe | None, ratio: float) -> Recipe:
    """``recipe`` with a ``prune-structured`` step first (MLP channels removed before anything
    else runs on the block), or that step alone for None."""
    step = STEPS["prune-structured"](ratio=ratio)
    if recipe is None:
        return Recipe((step,))
    if any(s.step == step.step for s in recipe.steps):
        raise LowbitError("the recipe prunes MLP channels already; drop --prune-structured")
    return Recipe((step, *recipe.steps), recipe.calibration)


def with_kv(recipe: Recipe, fmt: str) -> Recipe:
    """``recipe`` with a ``kv`` step last: the model runs with a ``fmt`` KV cache
    (``lowbit.methods.kvcache``)."""
    if any(s.kind == "cache" for s in recipe.steps):
        raise LowbitError("the recipe has a kv step already; drop --kv")
    return Recipe((*recipe.steps, STEPS["kv"](format=fmt)), recipe.calibration)


def step_fields(step: Step) -> dict:
    return {f.name: getattr(step, f.name) for f in fields(step)}
