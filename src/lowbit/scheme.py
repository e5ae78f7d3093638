"""Quantization schemes: a frozen, validated description of a weight number format.

Scheme names (``--scheme``):

- ``w4g64``  4-bit integer, symmetric, groups of 64 along the input dimension, fp16 scales
- ``w4``     per output channel; ``w8-tensor`` one scale for the whole tensor
- ``-asym``  adds an integer zero point per group; ``-mse`` searches the clipping range
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

from lowbit.errors import LowbitError

Granularity = Literal["tensor", "channel", "group"]

_NAME = re.compile(
    r"^w(?P<bits>\d+)(?:g(?P<group>\d+)|-(?P<tensor>tensor))?(?P<opts>(?:-[a-z0-9]+)*)$"
)
_OPTS = {"asym", "sym", "mse", "minmax"}


@dataclass(frozen=True)
class Scheme:
    """An integer affine weight format: ``w_hat = scale * (q - zero)``, q in [0, 2^bits - 1]."""

    bits: int = 4
    granularity: Granularity = "group"
    group_size: int = 64
    symmetric: bool = True
    clip: Literal["minmax", "mse"] = "minmax"
    scale_dtype: Literal["float16", "float32"] = "float16"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LowbitError(f"integer schemes take 2..8 bits, not {self.bits}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise LowbitError(
                f"granularity must be tensor, channel or group, not {self.granularity!r}"
            )
        if self.granularity == "group" and self.group_size < 1:
            raise LowbitError(f"group size must be positive, not {self.group_size}")
        if self.clip not in ("minmax", "mse"):
            raise LowbitError(f"clip must be 'minmax' or 'mse', not {self.clip!r}")

    @property
    def name(self) -> str:
        core = f"w{self.bits}"
        if self.granularity == "group":
            core += f"g{self.group_size}"
        elif self.granularity == "tensor":
            core += "-tensor"
        if not self.symmetric:
            core += "-asym"
        if self.clip == "mse":
            core += "-mse"
        return core

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        """Number of scale groups along the input dimension (1 for channel/tensor)."""
        if self.granularity != "group":
            return 1
        check_group(self.group_size, in_features)
        return in_features // self.group_size

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Storage cost per weight: codes plus scales plus zero points."""
        scale_bits = 16 if self.scale_dtype == "float16" else 32
        zero_bits = 0 if self.symmetric else self.bits
        per_param = scale_bits + zero_bits
        if self.granularity == "tensor":
            n_params = 1
        elif self.granularity == "channel":
            n_params = out_features
        else:
            n_params = out_features * self.groups(in_features)
        return self.bits + per_param * n_params / (out_features * in_features)

    def to_dict(self) -> dict:
        return asdict(self) | {"name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> Scheme:
        return cls(**{k: v for k, v in d.items() if k != "name"})


def check_group(group_size: int, in_features: int) -> None:
    if in_features % group_size:
        ok = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise LowbitError(
            f"group size {group_size} does not divide the input dimension {in_features}; "
            f"group sizes that do: {', '.join(map(str, ok)) or 'none of 16..256'}"
        )


def parse_scheme(name: str) -> Scheme:
    """Parse ``w4g64``, ``w3g64-asym``, ``w8``, ``w8-tensor``, ``w4g128-mse`` ..."""
    m = _NAME.match(name.strip().lower())
    if not m:
        raise LowbitError(
            f"unknown scheme {name!r}; integer schemes look like w4g64, w4g64-asym, w8, "
            "w8-tensor, w3g64-mse"
        )
    opts = [o for o in m.group("opts").split("-") if o]
    bad = [o for o in opts if o not in _OPTS]
    if bad:
        raise LowbitError(f"unknown scheme option(s) {bad} in {name!r}; options: {sorted(_OPTS)}")
    if m.group("group"):
        gran, gs = "group", int(m.group("group"))
    elif m.group("tensor"):
        gran, gs = "tensor", 0
    else:
        gran, gs = "channel", 0
    return Scheme(
        bits=int(m.group("bits")),
        granularity=gran,  # type: ignore[arg-type]
        group_size=gs,
        symmetric="asym" not in opts,
        clip="mse" if "mse" in opts else "minmax",
    )
