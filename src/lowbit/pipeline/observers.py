"""Statistics collected from a Linear's inputs during calibration (observe, never apply)."""

from __future__ import annotations

import torch


class InputStats:
    """Running input statistics of one Linear: Hessian H = 2 X^T X / n (float32, running mean),
    per-channel absmax and mean |x|, token count."""

    def __init__(self, in_features: int, hessian: bool = True) -> None:
        self.n = 0
        self.n_h = 0.0  # total token weight behind the Hessian when tokens are weighted
        self.h = torch.zeros(in_features, in_features) if hessian else None
        self.absmax = torch.zeros(in_features)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)

    def add(self, x: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Add a batch of inputs (..., in); ``token_weight`` (...,) weights each token's
        contribution to the Hessian (the running mean is then over the weights)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite values in the calibration activations")
        b = x.shape[0]
        if token_weight is not None:
            tw = token_weight.reshape(-1).float()
            b_h = float(tw.sum())
        total = self.n + b
        if self.h is not None:
            if token_weight is None:
                self.h.mul_(self.n / total).addmm_(x.T, x, alpha=2.0 / total)
            else:
                tot_h = self.n_h + b_h
                self.h.mul_(self.n_h / tot_h).addmm_((x * tw[:, None]).T, x, alpha=2.0 / tot_h)
                self.n_h = tot_h
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.n = total

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()
