"""Mixture-of-experts layers as one nn.Linear per expert.

transformers 5 stores a block's experts as fused 3-D parameters (``gate_up_proj`` (E, 2I, H),
gate rows first, and ``down_proj`` (E, H, I)) and runs them through kernels that no Linear hook
sees. ``unfuse_experts`` swaps each such module for ``LinearExperts``: a ModuleList of
``ExpertMLP`` whose Linears are named as in the checkpoints (``mlp.experts.3.gate_proj``,
Mixtral's ``w1``/``w3``/``w2``), running the same routed loop as transformers' eager experts.
Every per-Linear mechanism (statistics hooks, rounders, ``QLinear``, save and load, serving
exports) then works per expert.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.arch import SPECS, ArchSpec, get_blocks
from lowbit.errors import LowbitError


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its Linears named by the family."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act_fn,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden)),
                             strict=True):
            setattr(self, n, nn.Linear(i, o, bias=False, dtype=dtype))
        object.__setattr__(self, "act_fn", act_fn)  # not a child: no state of its own

    def inner(self, x: Tensor) -> Tensor:
        """The down projection's input."""
        g, u, _ = self.names
        return self.act_fn(getattr(self, g)(x)) * getattr(self, u)(x)

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, self.names[2])(self.inner(x))


class LinearExperts(nn.ModuleList):
    """The experts of one MoE block; called as transformers calls its fused experts."""

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            tok, pos = torch.where(top_k_index == e)
            y = self[e](hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    @classmethod
    @torch.no_grad()
    def from_fused(cls, fused: nn.Module, names: tuple[str, str, str]) -> LinearExperts:
        layout = {"is_transposed": False, "is_concatenated": True, "has_bias": False,
                  "has_gate": True}
        odd = [k for k, v in layout.items() if getattr(fused, k, v) != v]
        if odd:
            raise LowbitError(f"{type(fused).__name__}: unsupported expert layout "
                              f"({', '.join(odd)})")
        gu, dn = fused.gate_up_proj, fused.down_proj
        n, two_i, hidden = gu.shape
        inter = two_i // 2
        experts = cls([ExpertMLP(names, hidden, inter, fused.act_fn, gu.dtype)
                       for _ in range(n)]).to(gu.device)
        g, u, d = names
        for e, m in enumerate(experts):
            getattr(m, g).weight.copy_(gu[e, :inter])
            getattr(m, u).weight.copy_(gu[e, inter:])
            getattr(m, d).weight.copy_(dn[e])
        return experts


def moe_spec(model: nn.Module) -> ArchSpec | None:
    """The family table of a MoE model, None for every other model."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    return next((s for s in SPECS if mtype in s.model_types and s.moe is not None), None)


def unfuse_experts(model: nn.Module) -> int:
    """Swap every fused experts module of a MoE model for ``LinearExperts`` (same function);
    the number swapped (0 for other models, or when already done)."""
    spec = moe_spec(model)
    if spec is None:
        return 0
    done = 0
    for block in get_blocks(model, spec):
        parent_path, _, child = spec.moe.experts.rpartition(".")
        try:
            parent = block.get_submodule(parent_path)
        except AttributeError:
            continue
        fused = getattr(parent, child, None)
        if fused is None or isinstance(fused, LinearExperts) or not hasattr(fused, "gate_up_proj"):
            continue
        setattr(parent, child, LinearExperts.from_fused(fused, spec.moe.proj))
        done += 1
    return done
