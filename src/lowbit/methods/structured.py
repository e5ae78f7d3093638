"""Structured pruning of MLP channels: a smaller dense model that any runtime runs faster.

Every decoder block's MLP keeps the same number ``k`` of its intermediate channels (the config
stays an ordinary one: ``intermediate_size = k``), chosen per block by Wanda's score summed
over each channel, ``||W_down[:, c]||^2 * E[x_c^2]`` (the channel's contribution to the block
output if its inputs were independent), on the calibration inputs of the output Linear
(``down_proj``; ``fc2``). The output Linear is then refitted on the same inputs by least
squares, ``W' = W H[:, S] (H[S, S] + lambda I)^-1`` (H = E[x x^T]), so the kept channels make up
for the dropped ones as far as they are correlated with them (the structured form of OBS's
update). Sequential like every step: each block is pruned on inputs from the blocks already
pruned.

``ratio`` is the share of the model's parameters removed (embeddings and lm_head counted once
when tied), all of it from the MLPs: k is rounded up to a multiple of 64 (kernels and group
sizes; of the largest power of two up to n/16 for MLPs narrower than 1024 channels), so the
model shrinks by at most ``ratio``. Families whose MLP is a gate and an up
projection (or one input Linear) feeding one output Linear are supported; fused gate/up
matrices and GPT-2's Conv1D are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lowbit.arch import ArchSpec, get_blocks
from lowbit.errors import LowbitError
from lowbit.methods.base import Transform, register
from lowbit.methods.rtn import hessian_loss

MULTIPLE = 64  # kept channels per block: a multiple of this (when the MLP allows it)


def channel_scores(w_out: Tensor, h_diag: Tensor) -> Tensor:
    """Wanda's score of each input channel of an (out, in) Linear summed over its column."""
    return w_out.float().square().sum(0) * h_diag.float().clamp_min(0)


def refit(w_out: Tensor, h: Tensor, keep: Tensor, damp: float = 0.01) -> Tensor:
    """The (out, |keep|) weight over the kept inputs closest, on inputs with second moment
    ``h``, to ``w_out`` over all of them: ``W H[:, S] (H[S, S] + lambda I)^-1``."""
    w, h = w_out.double(), h.double()
    hs = h[keep][:, keep].clone()
    hs.diagonal().add_(damp * float(hs.diagonal().mean()))
    rhs = w @ h[:, keep]  # (out, |S|)
    return torch.linalg.solve(hs, rhs.T).T.to(w_out.dtype)


def mlp_parts(spec: ArchSpec) -> tuple[tuple[str, ...], str]:
    """(the MLP's input Linears, its output Linear) by name inside a block."""
    if spec.mlp_path is None or spec.conv1d or spec.moe is not None or len(spec.groups) != 4 \
            or len(spec.groups[3]) != 1:
        raise LowbitError(f"prune-structured: {spec.family} MLPs are not supported (gated or "
                          "plain MLPs of separate Linears only)")
    return spec.groups[2], spec.groups[3][0]


def _linear(block: nn.Module, name: str) -> nn.Linear:
    mod = block.get_submodule(name)
    if not isinstance(mod, nn.Linear):
        raise LowbitError(f"prune-structured: {name} is a {type(mod).__name__}, not a Linear")
    return mod


def _resize(mod: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    mod.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if mod.bias is not None:
        mod.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    mod.out_features, mod.in_features = weight.shape


@register
@dataclass(frozen=True)
class PruneStructured(Transform):
    """Remove ``ratio`` of the model's parameters as whole MLP channels (the same count in every
    block), the output Linear refitted on the calibration inputs."""

    step = "prune-structured"
    reshapes: ClassVar[bool] = True  # the model alone is an output (no layer need be rounded)
    ratio: float = 0.25
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.ratio < 1:
            raise LowbitError(f"prune-structured: ratio is the share of parameters removed, in "
                              f"(0, 1), not {self.ratio}")
        if not 0 <= self.damp < 1:
            raise LowbitError(f"prune-structured: damp must lie in [0, 1), not {self.damp}")

    def kept_channels(self, model: nn.Module, spec: ArchSpec) -> tuple[int, int, int]:
        """(channels each block keeps, channels it has, parameters per channel and block,
        the model's parameters)."""
        ins, out = mlp_parts(spec)
        blocks = get_blocks(model, spec)
        block = blocks[0]
        n = _linear(block, out).in_features
        for name in ins:
            if (m := _linear(block, name).out_features) != n:
                raise LowbitError(f"prune-structured: {name} has {m} outputs for {n} inputs "
                                  f"of {out} (a fused matrix?)")
        per_channel = sum(_linear(block, name).in_features for name in ins) \
            + _linear(block, out).out_features
        total = sum(p.numel() for p in model.parameters())  # tied tensors once
        k = n - math.ceil(self.ratio * total / (per_channel * len(blocks)))
        step = MULTIPLE if n >= 16 * MULTIPLE else 1 << max(0, (n // 16).bit_length() - 1)
        if n % step == 0:
            k = math.ceil(k / step) * step
        if k < max(1, n // 10):
            raise LowbitError(f"prune-structured: removing {self.ratio:.0%} of the parameters "
                              f"from the MLPs leaves {max(k, 0)} of {n} channels per block; "
                              "give a smaller ratio")
        return k, n, per_channel, total

    def check_plan(self, model: nn.Module, plan) -> None:
        """The output Linears' grids must fit their pruned input width."""
        if any(getattr(t, "online", False) or getattr(t, "incoherent", False)
               for t in plan.transforms):
            raise LowbitError("prune-structured removes MLP channels that a run-time rotation "
                              "(--rotate-online, --incoherence) mixes: leave one out")
        if any(getattr(la.step, "model_wise", False) for la in plan.layers.values()):
            raise LowbitError("prune-structured changes each block as it runs, after qat's "
                              "training: prune first and train the pruned model in a second run")
        k = self.kept_channels(model, plan.spec)[0]
        out = mlp_parts(plan.spec)[1]
        for full, la in plan.layers.items():
            if la.local == out and la.grid is not None:
                try:
                    la.grid.check(model.get_submodule(full).out_features, k)
                except LowbitError as e:
                    raise LowbitError(f"{full} keeps {k} inputs: {e}") from None

    def transform_model(self, model: nn.Module, spec: ArchSpec) -> list[dict]:
        k, n, per_channel, before = self.kept_channels(model, spec)
        object.__setattr__(self, "_k", k)  # the blocks' width, for transform and shape_block
        after = before - (n - k) * per_channel * len(get_blocks(model, spec))
        model.config.intermediate_size = k
        return [{"channels_kept": k, "channels": n, "parameters": before,
                 "parameters_after": after, "removed": round(1 - after / before, 4)}]

    def shape_block(self, block: nn.Module, spec: ArchSpec) -> None:
        """Give a block its pruned shapes (the weights to be filled by a checkpoint)."""
        ins, out = mlp_parts(spec)
        k = self._k
        for name in ins:
            mod = _linear(block, name)
            _resize(mod, mod.weight.data[:k], None if mod.bias is None else mod.bias.data[:k])
        mod = _linear(block, out)
        _resize(mod, mod.weight.data[:, :k], None if mod.bias is None else mod.bias.data)

    def transform(self, ctx, plan) -> list[dict]:
        ins, out = mlp_parts(ctx.spec)
        stats, _ = ctx.observe([out], frozenset({"hessian"}))
        h = stats[out].h
        down = _linear(ctx.block, out)
        n, k = down.in_features, self._k
        keep_idx = channel_scores(down.weight.data, h.diagonal()).topk(k).indices.sort().values
        keep = torch.zeros(n, dtype=torch.bool)
        keep[keep_idx] = True
        w_new = refit(down.weight.data, h, keep, self.damp)
        err = down.weight.data.double().clone()
        err[:, keep] -= w_new.double()  # the dropped columns stay in err
        ratio = hessian_loss(err, h.double()) / max(hessian_loss(down.weight.data.double(),
                                                                 h.double()), 1e-30)
        for name in ins:
            mod = _linear(ctx.block, name)
            _resize(mod, mod.weight.data[keep],
                    None if mod.bias is None else mod.bias.data[keep])
        _resize(down, w_new, None if down.bias is None else down.bias.data)
        return [{"layer": ctx.full(out), "channels_kept": k, "channels": n,
                 "output_error": round(ratio, 5)}]
