"""End-to-end quantization-aware training by distillation (LLM-QAT / EfficientQAT's second
phase, BitNet b1.58 fine-tuning for ternary weights), on a CPU.

Before the driver's blocks, every Linear the step owns is wrapped (``_Student``) so that the
model computes with its weight fake-quantized; the model then learns, on the calibration
windows repeated for a budget of ``tokens``, to reproduce its own full-precision next-token
distributions: the loss is KL(teacher || student) over the whole vocabulary at every position.
The teacher is the same model with the wrappers switched to the original weights (no second
copy of the model is held). Afterwards each weight is frozen onto its grid and the driver
stores it like any rounder's output.

What is learned, per Linear (``train``):

- ``weights`` (default): an offset ``v`` for every weight in units of its grid step (the
  latent weight is ``w0 + v * s``) and, on integer grids, the group scales ``s = s0 * exp(u)``
  through LSQ's fake quantization (``methods.fakequant.lsq_int``: straight-through rounding,
  LSQ's gradient scaling);
- ``scales``: only the scales (EfficientQAT's end-to-end phase): the codes can still change
  where a scale moves.

Grids: integer grids with a scale per row or group (``w4g64``, ``w3g64-asym``, ``w4``...; with
per-token activations, ``w4g64a8``, the student rounds its inputs as ``QLinear`` will); grids of
at most 16 levels (``nf4``, ``fp4-g32``, ``mxfp4``, ``nvfp4``), whose scales stay the RTN fit's
and whose offsets count gaps between the levels around each weight
(``methods.fakequant.level_gaps``), through the grid's own round trip; and
``ternary`` (BitNet b1.58: gamma = mean|w| of the latent weight at every step, codes
clip(round(w / gamma), -1, 1), straight-through). Ternary training starts from the float
weights: for the first ``warmup`` fraction of steps the forward pass mixes the weight with its
ternary value, ``w + lambda (t(w) - w)`` with lambda rising linearly from 0 to 1 (the gradual
warm-up of the BitNet fine-tuning reports); integer grids start from RTN (lambda = 1).

Optimiser: Adam with a cosine decay to zero. Its step ``lr`` is in grid steps per update for
the offsets (default ``2e-3``: the 2e-5 that LLM-QAT and EfficientQAT use on weights of scale
~0.02 whose 4-bit step is ~0.01) and, for the log-scales, the same (a relative change of the
scale: EfficientQAT's 2e-5 on scales of ~0.01). Adam moves a parameter
by about ``lr`` per update, so over ``n`` updates a weight can travel about ``n * lr`` steps:
a budget, not a constant tuned to one model.

Resumable: with a run checkpoint (``lowbit quantize`` keeps one next to ``--out``) the state
(learned tensors, Adam's moments, the step) is written every ``save_every`` steps and a run
started again goes on from there; the batches are drawn from ``seed``, so the resumed run sees
the same windows as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.arch import get_weight
from lowbit.errors import LowbitError
from lowbit.formats.grid_base import WeightGrid, grouped_args
from lowbit.formats.grids_lut import TernaryGrid
from lowbit.formats.integer import IntGrid
from lowbit.formats.weight import GridWeight
from lowbit.methods.base import Rounder, register
from lowbit.methods.fakequant import fake_quant, fake_quant_activations, level_gaps, lsq_int
from lowbit.pipeline.dist import world

TRAIN = ("weights", "scales")
STATE_FILE = "qat-state.pt"


class _Student(nn.Module):
    """A Linear's stand-in while training: ``x @ w_hat.T + b`` with ``w_hat`` the fake-quantized
    latent weight, or the original weight ``w0`` in teacher mode."""

    def __init__(self, mod: nn.Module, w0: Tensor, grid: WeightGrid, train: str) -> None:
        super().__init__()
        self.w0, self.grid = w0, grid  # w0: (out, in), the model's own tensor
        self.bias = getattr(mod, "bias", None)
        self.in_rotation = getattr(mod, "in_rotation", None)
        self.out_rotation = getattr(mod, "out_rotation", None)
        self.teacher, self.mix = False, 1.0
        w = w0.detach().float()
        p = grid.finalize(grid.fit_all(w, None, grid.prepare(w)))
        self.params = p
        if isinstance(grid, IntGrid):  # offsets in steps of the learned scale (lsq_int)
            self.s0, self.unit = p["scale"].float(), None  # (out, groups)
        elif isinstance(grid, TernaryGrid):  # offsets in steps of the starting gamma
            self.s0, self.unit = None, p["gamma"].float().flatten()[:1].reshape(1, 1)
        else:  # NF4, FP4, MX: in gaps between the levels around each weight, fixed scales
            self.s0, self.unit = None, level_gaps(grid, w, p)
        self.v = nn.Parameter(torch.zeros_like(w), requires_grad=train == "weights")
        self.u = nn.Parameter(torch.zeros_like(self.s0) if self.s0 is not None
                              else torch.zeros(0), requires_grad=self.s0 is not None)

    @property
    def weight(self) -> Tensor:  # what code reading ``module.weight`` (its dtype) expects
        return self.w0

    def scale(self) -> Tensor:
        """The learned scales, rounded (straight through) to the dtype they are stored in."""
        s = self.s0 * torch.exp(self.u)
        stored = s.detach().to(getattr(torch, self.grid.scale_dtype)).float()
        return s + (stored - s.detach())

    def quantized(self) -> Tensor:
        """The fake-quantized weight (float32, (out, in)), differentiable in ``v`` and ``u``."""
        w0 = self.w0.float()
        if isinstance(self.grid, IntGrid):
            return lsq_int(w0, self.scale(), self.params["zero"].float(), self.grid.bits,
                           self.grid.group_size, offsets=self.v)
        w = w0 + self.v * self.unit
        if not isinstance(self.grid, TernaryGrid):
            return fake_quant(w, self.grid, self.params)
        gamma = w.detach().abs().mean().clamp(min=1e-5)
        wd = w.detach()
        t = torch.round(wd / gamma).clamp(-1, 1) * gamma
        if self.mix < 1:  # the warm-up: part float, part ternary
            t = (1 - self.mix) * wd + self.mix * t
        return t + (w - wd)  # BitNet's straight-through: identity backward

    def forward(self, x: Tensor) -> Tensor:
        if self.in_rotation is not None:  # R4 / incoherence set by methods.rotate
            x = self.in_rotation(x)
        act = getattr(self.grid, "act_bits", None)
        if act and not self.teacher:  # w4g64a8 ...: per-token activations, as QLinear rounds
            x = fake_quant_activations(x.float(), act).to(x.dtype)
        w = self.w0 if self.teacher else self.quantized().to(x.dtype)
        y = F.linear(x, w, self.bias)
        return y if self.out_rotation is None else self.out_rotation(y)

    @torch.no_grad()
    def freeze(self) -> GridWeight:
        """The learned weight on the grid, as the driver stores it."""
        w0 = self.w0.float()
        if isinstance(self.grid, IntGrid):  # lsq_int's own rounding, on the stored scales
            scale, zero = self.scale(), self.params["zero"].float()
            gs = self.grid.group_size or w0.shape[1]
            x = w0.reshape(w0.shape[0], -1, gs) / scale.unsqueeze(-1) + \
                self.v.reshape(w0.shape[0], -1, gs)
            q = torch.round(x) + zero.unsqueeze(-1)
            sat = ((q < 0) | (q > self.grid.qmax)).reshape(w0.shape).sum(1)
            codes = q.clamp(0, self.grid.qmax).to(torch.uint8).reshape(w0.shape)
            return GridWeight(self.grid, codes, dict(self.params) | {"scale": scale},
                              saturated=sat)
        w = w0 + self.v * self.unit
        p = self.params  # ternary: gamma is mean|w| of the trained weight, as in training
        if isinstance(self.grid, TernaryGrid):
            p = self.grid.finalize(self.grid.fit_all(w, None, self.grid.prepare(w)))
        xv, pv = grouped_args(self.grid, w, p)
        codes = self.grid.encode(xv, pv).reshape(w.shape)
        sat = self.grid.saturated(xv, pv).reshape(w.shape).sum(1)
        return GridWeight(self.grid, codes, p, saturated=sat)


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    owner, _, child = name.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _kl(teacher: Tensor, student: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student), from logits."""
    t = torch.log_softmax(teacher.float(), -1)
    s = torch.log_softmax(student.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


@register
@dataclass(frozen=True)
class QAT(Rounder):
    """End-to-end distillation onto the grid (see the module docstring)."""

    model_wise: ClassVar[bool] = True

    step = "qat"
    tokens: int = 262144  # distillation tokens (the windows repeat as needed)
    train: str = "weights"  # weights (offsets and scales) or scales
    lr: float = 2e-3  # Adam's step: offsets in grid steps, scales relative (log-scale)
    batch: int = 1  # windows per step
    warmup: float = 0.25  # ternary: fraction of the steps over which lambda rises to 1
    save_every: int = 25  # steps between resumable states (with a run checkpoint)
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train not in TRAIN:
            raise LowbitError(f"qat: train must be one of {', '.join(TRAIN)}, not {self.train!r}")
        for name in ("tokens", "batch", "save_every"):
            if getattr(self, name) < 1:
                raise LowbitError(f"qat: {name} must be at least 1, not {getattr(self, name)}")
        if not self.lr > 0:
            raise LowbitError(f"qat: lr must be positive, not {self.lr}")
        if not 0 <= self.warmup < 1:
            raise LowbitError(f"qat: warmup is a fraction of the steps in [0, 1), not "
                              f"{self.warmup}")

    def check_grid(self, grid: WeightGrid) -> None:
        if isinstance(grid, IntGrid):
            if grid.granularity == "tensor":
                raise LowbitError(f"qat: {grid.name} has one scale for the tensor; qat trains "
                                  "integer grids with a scale per row or group (w4g64, w4)")
            return
        if grid.needs_sensitivity or grid.code_bits > 4:
            raise LowbitError(f"qat: {grid.name} is not a grid qat trains: integer grids, "
                              "ternary and grids of at most 16 levels (nf4, fp4-g32, mxfp4, "
                              "nvfp4)")
        if self.train == "scales":
            raise LowbitError(f"qat: {grid.name}'s scales follow its weights (absmax, mean|w|, "
                              "shared exponents); train=scales is for integer grids")

    def wants(self, grid: WeightGrid) -> frozenset[str]:
        return frozenset()

    def needs_data(self) -> bool:
        return True

    def round_layers(self, weights: dict, grids: dict, stats) -> dict:
        raise LowbitError("qat rounds the whole model at once; its layers are learned before "
                          "the blocks run")

    def steps_for(self, seq_len: int) -> int:
        return max(1, math.ceil(self.tokens / (self.batch * seq_len)))

    def train_model(self, model: nn.Module, spec, layers: dict[str, WeightGrid], calib: Tensor,
                    checkpoint=None, progress: bool = True,
                    monitor: Callable[[int, int], None] | None = None, every: int = 0) -> dict:
        """Learn ``layers`` (full name -> grid, every one a plain Linear of ``model``) on the
        windows ``calib`` (n, seq_len); returns full name -> (GridWeight, info row).
        ``monitor(step, tokens)`` is called before the first step and every ``every`` steps,
        with the model computing as the fake-quantized student (a training curve)."""
        if world()[1] > 1:
            raise LowbitError("qat trains the whole model in one process; run it without "
                              "--nproc")
        t0 = time.perf_counter()
        students: dict[str, _Student] = {}
        originals: dict[str, nn.Module] = {}
        for full, grid in layers.items():
            mod = model.get_submodule(full)
            if not hasattr(mod, "weight") or mod.weight.dim() != 2:
                raise LowbitError(f"qat: {full} is not a Linear ({type(mod).__name__}); qat "
                                  "trains models whose quantized layers are Linears")
            w = get_weight(mod, spec)
            students[full] = _Student(mod, w, grid, self.train)
        frozen = [p for p in model.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            for full, st in students.items():
                originals[full] = _swap(model, full, st)
            start = self._learn(model, students, calib, checkpoint, progress, monitor, every)
        finally:
            for full, mod in originals.items():
                _swap(model, full, mod)
            for p in frozen:
                p.requires_grad_(True)
        secs = round((time.perf_counter() - t0) / max(1, len(students)), 3)
        out = {}
        for full, st in students.items():
            gw = st.freeze()
            changed = None
            if isinstance(st.grid, IntGrid):  # against round-to-nearest on the RTN scales
                nearest = st.grid.encode(*grouped_args(st.grid, st.w0.float(), st.params))
                changed = float((gw.codes != nearest.reshape(gw.shape)).float().mean())
            out[full] = (gw, {"tokens_trained": start["tokens"], "kl_start": start["kl_start"],
                              "kl_end": start["kl_end"], "train": self.train,
                              "codes_changed": None if changed is None else round(changed, 4),
                              "seconds": secs, "saturated": gw.n_saturated})
        return out

    def _learn(self, model: nn.Module, students: dict[str, _Student], calib: Tensor,
               checkpoint, progress: bool, monitor=None, every: int = 0) -> dict:
        n, seq = calib.shape
        steps = self.steps_for(seq)
        g = torch.Generator().manual_seed(self.seed)  # the windows in shuffled passes
        order = torch.cat([torch.randperm(n, generator=g)
                           for _ in range(math.ceil(steps * self.batch / n))])
        params_v = [st.v for st in students.values() if st.v.requires_grad]
        params_u = [st.u for st in students.values() if st.u.requires_grad]
        groups = [{"params": params_v, "lr": self.lr}] if params_v else []
        groups += [{"params": params_u, "lr": self.lr}] if params_u else []
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
        ternary = any(isinstance(st.grid, TernaryGrid) for st in students.values())
        ramp = self.warmup * steps if ternary else 0.0
        state = {"step": 0, "kl_start": None, "kl_end": None, "tokens": 0, "recent": []}
        path = None if checkpoint is None else checkpoint.folder / STATE_FILE
        if path is not None and path.is_file():
            saved = torch.load(path, weights_only=True)
            state = saved["state"]
            for full, st in students.items():
                st.v.data.copy_(saved["v"][full])
                st.u.data.copy_(saved["u"][full])
            if state["step"] < steps:  # (a finished run may be resumed for fewer layers)
                opt.load_state_dict(saved["opt"])
                sched.load_state_dict(saved["sched"])
            checkpoint.note(f"qat: resuming at step {state['step']} of {steps} from {path}")
            checkpoint.trained = f"qat's training at step {state['step']} of {steps}"

        def save() -> None:
            if path is None:
                return
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save({"v": {f: st.v.data for f, st in students.items()},
                        "u": {f: st.u.data for f, st in students.items()},
                        "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "state": state}, tmp)
            os.replace(tmp, path)
            checkpoint.trained = f"qat's training at step {state['step']} of {steps}"

        def teacher_mode(on: bool) -> None:
            for st in students.values():
                st.teacher = on

        bar = tqdm(total=steps * self.batch * seq, initial=state["step"] * self.batch * seq,
                   desc="qat", unit="tok", unit_scale=True, disable=not progress)
        model_was_training = model.training
        model.eval()
        recent: list[float] = state["recent"]  # the last 20 steps' KL (kl_end: their mean)
        try:
            if state["kl_start"] is None:  # the start (RTN, ternary at lambda = 1), 1st batch
                with torch.no_grad():
                    ids = calib[order[:self.batch]]
                    teacher_mode(True)
                    t_logits = model(input_ids=ids, use_cache=False).logits
                    teacher_mode(False)
                    kl = _kl(t_logits, model(input_ids=ids, use_cache=False).logits)
                    state["kl_start"] = round(float(kl), 5)
            for it in range(state["step"], steps):
                if monitor is not None and every and it % every == 0:
                    with torch.no_grad():
                        monitor(it, it * self.batch * seq)
                rows = order[it * self.batch:(it + 1) * self.batch]
                ids = calib[rows]
                mix = min(1.0, (it + 1) / ramp) if ramp else 1.0
                for st in students.values():
                    st.mix = mix
                with torch.no_grad():
                    teacher_mode(True)
                    t_logits = model(input_ids=ids, use_cache=False).logits
                    teacher_mode(False)
                with torch.enable_grad():
                    loss = _kl(t_logits, model(input_ids=ids, use_cache=False).logits)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                sched.step()
                kl = float(loss)
                recent[:] = (recent + [kl])[-20:]
                state["step"], state["tokens"] = it + 1, (it + 1) * self.batch * seq
                state["kl_end"] = round(sum(recent) / len(recent), 5)
                bar.update(self.batch * seq)
                bar.set_postfix(kl=f"{state['kl_end']:.4f}", refresh=False)
                if (it + 1) % self.save_every == 0 and it + 1 < steps:
                    save()
        finally:
            bar.close()
            model.train(model_was_training)
            teacher_mode(False)
        save()
        return state
