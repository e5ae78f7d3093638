"""Recipe steps: small frozen configs registered under a name, each naming the layers it acts on.

Four kinds, run in this order inside every decoder block by ``lowbit.pipeline.plan``:

- transforms keep the function of the full-precision model (AWQ and SmoothQuant scales);
- pruners zero a share of a layer's weights just before its rounder (``methods.prune``);
- rounders put a layer's weight on a grid (RTN, GPTQ, HQQ): every layer has at most one;
- replacers swap a Linear for a runtime module with its own arithmetic (W8A8, FP8, LLM.int8());

and, once after the last block, a ``cache`` step (``kv``) picks the KV-cache format the model
runs with (``lowbit.methods.kvcache``).

Layers are named by their full module name (``model.layers.3.mlp.down_proj``, ``lm_head``).
``targets`` and ``ignore`` are patterns as llm-compressor and compressed-tensors write them:
``Linear`` (every quantizable Linear: the decoder blocks' and lm_head), an exact module name,
or ``re:<regex>`` (``re.match`` against the full name). By default every block Linear is a
target and ``lm_head`` is ignored. A rounder's ``overrides`` map patterns to other schemes
(the first that matches wins), which is how mixed precision is written.

A new method is one module with a ``Step`` subclass decorated with ``@register``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

from lowbit.errors import LowbitError
from lowbit.formats.grid_base import WeightGrid
from lowbit.formats.grids import get_grid

STEPS: dict[str, type[Step]] = {}
KINDS = ("transform", "pruner", "rounder", "replacer", "cache")


def register(cls: type[Step]) -> type[Step]:
    """File a step class under its ``step`` name."""
    if cls.step in STEPS:
        raise LowbitError(f"step {cls.step!r} is registered twice")
    if cls.kind not in KINDS:
        raise LowbitError(f"step {cls.step!r}: kind must be one of {KINDS}, not {cls.kind!r}")
    STEPS[cls.step] = cls
    return cls


def check_pattern(pattern: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise LowbitError(f"a layer pattern must be a non-empty string, not {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise LowbitError(f"bad regular expression in {pattern!r}: {e}") from None


def matches(pattern: str, name: str) -> bool:
    """``Linear`` matches every candidate layer; ``re:<regex>`` by ``re.match``; else equality."""
    if pattern == "Linear":
        return True
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def _check_type(step: str, key: str, value: Any, hint: Any) -> None:
    """A recipe value against its option's annotation (bool, int, float, str, optional ones;
    lists and mappings are checked by the step itself)."""
    args = get_args(hint)
    if value is None and type(None) in args:
        return
    kinds = [a for a in args if a is not type(None)] if args and get_origin(hint) is not tuple \
        else [hint]
    base = get_origin(kinds[0]) or kinds[0]
    if base is bool and not isinstance(value, bool):
        raise LowbitError(f"{step}: {key} must be true or false, not {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise LowbitError(f"{step}: {key} must be a whole number, not {value!r}")
    if base is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise LowbitError(f"{step}: {key} must be a number, not {value!r}")
    if base is str and not isinstance(value, str):
        raise LowbitError(f"{step}: {key} must be a string, not {value!r}")


def _as_tuple(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, list | tuple):
        raise LowbitError(f"{what} must be a list of layer patterns, not {value!r}")
    for p in value:
        check_pattern(p)
    return tuple(value)


@dataclass(frozen=True)
class Step:
    """Base of every step: which layers it acts on."""

    step: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _as_tuple(self.targets, f"{self.step}: targets"))
        object.__setattr__(self, "ignore", _as_tuple(self.ignore, f"{self.step}: ignore"))

    def applies(self, name: str) -> bool:
        return any(matches(t, name) for t in self.targets) and not any(
            matches(i, name) for i in self.ignore
        )

    def needs_data(self) -> bool:
        """Whether the step needs calibration windows at all."""
        return False

    # -- as data
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"step": self.step}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "overrides":
                v = dict(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> Step:
        known = {f.name: f for f in fields(cls)}
        bad = [k for k in d if k not in known]
        if bad:
            raise LowbitError(
                f"step {cls.step!r} has no option(s) {', '.join(map(repr, bad))}; "
                f"its options: {', '.join(known)}"
            )
        hints = get_type_hints(cls)
        for k, v in d.items():
            _check_type(cls.step, k, v, hints[k])
        return cls(**d)


@dataclass(frozen=True)
class Rounder(Step):
    """A step that puts weights on a grid: ``scheme`` for every target, ``overrides`` by layer."""

    kind: ClassVar[str] = "rounder"
    # each output row is rounded on its own (on a grid whose rows are independent, ``stackable``)
    # so the rows of a Linear may be rounded in separate processes (``lowbit.pipeline.dist``)
    row_separable: ClassVar[bool] = False
    scheme: str = "w4g64"
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        ov = self.overrides
        if isinstance(ov, dict):
            ov = tuple(ov.items())
        if not isinstance(ov, tuple | list) or not all(
            isinstance(p, tuple | list) and len(p) == 2 for p in ov
        ):
            raise LowbitError(f"{self.step}: overrides map layer patterns to schemes, "
                              f"e.g. {{'re:.*down_proj': 'w8'}}; got {self.overrides!r}")
        ov = tuple((str(p), str(s)) for p, s in ov)
        for p, s in ov:
            check_pattern(p)
            self.check_grid(get_grid(s))
        object.__setattr__(self, "overrides", ov)
        self.check_grid(get_grid(self.scheme))

    def check_grid(self, grid: WeightGrid) -> None:
        """Refuse grids the rounder cannot target (LowbitError)."""

    def scheme_for(self, name: str) -> str:
        for pattern, scheme in self.overrides:
            if matches(pattern, name):
                return scheme
        return self.scheme

    def grid_for(self, name: str) -> WeightGrid:
        return get_grid(self.scheme_for(name))

    def wants(self, grid: WeightGrid) -> frozenset[str]:
        """Statistics of the layer's input the rounding needs."""
        return frozenset({"hessian"}) if grid.needs_sensitivity else frozenset()

    def needs_data(self) -> bool:
        grids = [get_grid(self.scheme)] + [get_grid(s) for _, s in self.overrides]
        return any(self.wants(g) for g in grids)

    def round_layers(self, weights: dict, grids: dict, stats) -> dict:
        """Round the named weights ((out, in) tensors) that share one input, whose statistics
        are ``stats`` (an ``InputStats`` or None). Returns name -> (GridWeight, info row)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Transform(Step):
    """A function-preserving change of a block before rounding (scales folded into the model)."""

    kind: ClassVar[str] = "transform"

    def needs_data(self) -> bool:
        return True

    def sample(self, windows):
        """Windows for a second, small stream of block inputs (None: not needed)."""
        return None

    def transform(self, ctx, plan) -> list[dict]:
        """Change the block of ``ctx`` (a ``pipeline.driver.BlockContext``) in place. ``plan``
        (``pipeline.plan.Plan``) tells which layers are quantized (``plan.layers``) and onto
        which grid they will be rounded (``plan.grid_of(full_name)``). Returns log rows."""
        raise NotImplementedError


@dataclass(frozen=True)
class Replacer(Step):
    """A step that swaps a Linear for a runtime module with its own arithmetic."""

    kind: ClassVar[str] = "replacer"

    def wants(self) -> frozenset[str]:
        """Statistics of the layer's input needed before replacing it."""
        return frozenset()

    def needs_data(self) -> bool:
        return bool(self.wants())

    def make(self, w, bias, stats):
        """(module, info row) for an (out, in) weight, its bias and input statistics."""
        raise NotImplementedError

    def finish(self, module) -> dict:
        """Called once the block has run with the new module (delayed scaling); info row."""
        return {}
