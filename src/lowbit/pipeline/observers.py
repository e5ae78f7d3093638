"""Statistics collected from a Linear's inputs during calibration (observe, never apply)."""

from __future__ import annotations

import torch


class InputStats:
    """Running input statistics of one Linear: Hessian H = 2 X^T X / n (float32, running mean),
    per-channel absmax and mean |x|, token count."""

    def __init__(self, in_features: int, hessian: bool = True) -> None:
        self.n = 0
        self.h = torch.zeros(in_features, in_features) if hessian else None
        self.absmax = torch.zeros(in_features)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite values in the calibration activations")
        b = x.shape[0]
        total = self.n + b
        if self.h is not None:
            self.h.mul_(self.n / total).addmm_(x.T, x, alpha=2.0 / total)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.n = total

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()
