"""AWQ (Lin et al.): activation-aware per-input-channel scaling, then weight clipping.

Search first, quantize after: block by block on the full-precision model, for every group of
Linears sharing an input, scales ``s = mean|x|^alpha`` (normalised so max * min = 1) are tried
for ``alpha`` on a grid; the group's weights are replaced by ``Q(W diag(s)) diag(s)^-1`` and the
mean squared error of the *block's output* against the full-precision block on a subsample of
the calibration windows decides. The best scales are folded (``lowbit.methods.fold``): the
model computes the same function in full precision. Then, per Linear except the query and key
projections, the clipping range of each (output row, group) is shrunk by the ratio that
minimises the Linear's output error on sampled inputs. The rounding itself (RTN or GPTQ) runs
afterwards through ``quantize_model``.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.arch import ArchSpec, block_linears, get_blocks
from lowbit.errors import LowbitError
from lowbit.methods.fold import Feed, apply_scales, feeds, kv_expand, kv_layout, kv_reduce
from lowbit.pipeline.act_stats import MIN_TOKENS
from lowbit.pipeline.driver import capture_inputs, get_weight, set_weight
from lowbit.scheme import Scheme

NO_CLIP = ("q_proj", "k_proj")  # AWQ leaves these unclipped (errors there pass the softmax)


def fake_quant(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    return rtn_quantize(w, scheme).dequantize()


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalised so that max(s) * min(s) = 1."""
    s = mean_abs.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def clip_search(
    w: torch.Tensor, x: torch.Tensor, scheme: Scheme, n_ratios: int = 10, shrink: float = 0.5
) -> tuple[torch.Tensor, dict]:
    """The weight clipped per (row, group) to the range ratio in ``1 - i / (2 n_ratios / ...)``
    (1.0 down to ``1 - shrink``) that minimises ||(Q(W_clipped) - W) x||^2 over the sampled
    inputs x (tokens, in). Returns the clipped weight and the mean ratio chosen."""
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = scheme.group_size if scheme.granularity == "group" else in_f
    ng = in_f // gs
    wg = w.reshape(out_f, ng, gs)
    xg = x.float().reshape(-1, ng, gs)
    if scheme.symmetric:
        hi0 = wg.abs().amax(-1, keepdim=True)
        lo0 = -hi0
    else:
        hi0 = wg.amax(-1, keepdim=True)
        lo0 = wg.amin(-1, keepdim=True)
    best_err = torch.full((out_f, ng), float("inf"))
    best = torch.ones(out_f, ng)
    ratios = [1.0 - shrink * i / n_ratios for i in range(n_ratios)]
    for r in ratios:
        wc = torch.maximum(torch.minimum(wg, hi0 * r), lo0 * r)
        dq = fake_quant(wc.reshape(out_f, in_f), scheme).reshape(out_f, ng, gs)
        err = torch.einsum("ogk,tgk->otg", dq - wg, xg).pow(2).sum(1)  # (out, groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    b = best[..., None]
    clipped = torch.maximum(torch.minimum(wg, hi0 * b), lo0 * b).reshape(out_f, in_f)
    return clipped, {"clip_mean": float(best.mean()), "clip_frac": float((best < 1).float().mean())}


def _run(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    outs = []
    for h, kw in zip(hidden, kwargs, strict=True):
        o = block(h, **kw)
        outs.append(o[0] if isinstance(o, tuple) else o)
    return outs


def _collect_inputs(block, spec, names, hidden, kwargs, fn) -> list[torch.Tensor]:
    """Call ``fn(name, x)`` with each named Linear's input, for every chunk; the block's
    outputs."""
    linears = block_linears(block, spec)
    handles = [
        linears[n].register_forward_pre_hook(lambda _m, a, n=n: fn(n, a[0])) for n in names
    ]
    try:
        return _run(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _search_feed(
    block, spec, feed: Feed, mean_abs, layout, hidden_s, kwargs_s, target, scheme, n_grid
) -> tuple[torch.Tensor, dict]:
    """Best scales for one group, by the block-output error on the search subsample."""
    lins = {n: block.get_submodule(n) for n in feed.group}
    orig = {n: get_weight(m, spec).clone() for n, m in lins.items()}
    gqa = feed.kind == "linear" and layout is not None and (
        get_weight(block.get_submodule(feed.source), spec).shape[0] != mean_abs.shape[0]
    )
    m = kv_reduce(mean_abs, layout) if gqa else mean_abs
    losses = []
    best, best_loss = None, float("inf")
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = awq_scales(m, alpha)
            s_in = kv_expand(s, layout) if gqa else s
            for n, mod in lins.items():
                w = orig[n] * s_in[None, :]
                set_weight(mod, spec, fake_quant(w, scheme) / s_in[None, :])
            out = _run(block, hidden_s, kwargs_s)
            loss = sum(float((o - t).pow(2).mean()) for o, t in zip(out, target, strict=True))
            loss /= len(out)
            losses.append(loss)
            if loss < best_loss:
                best, best_loss = (alpha, s), loss
    finally:
        for n, mod in lins.items():
            set_weight(mod, spec, orig[n])
    alpha, s = best
    return s, {"alpha": alpha, "block_loss": best_loss, "block_loss_alpha0": losses[0]}


def _check_finite(hidden: list[torch.Tensor], where: str) -> None:
    for h in hidden:
        if not torch.isfinite(h).all():
            raise LowbitError(f"non-finite activations at {where}")


@torch.no_grad()
def awq_transform(
    model: nn.Module,
    spec: ArchSpec,
    windows: torch.Tensor,
    scheme: Scheme,
    n_grid: int = 20,
    search_windows: int = 4,
    search_tokens: int | None = None,
    clip: bool = True,
    clip_tokens: int = 1024,
    chunk: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Fold AWQ scales into the model and clip its weights in place (still full precision:
    the rounding comes after). ``search_windows`` windows (spread over the calibration set,
    cut to their first ``search_tokens`` tokens if given) make the search's loss. Returns one
    row per group (alpha, losses) and per clipped Linear."""
    if not isinstance(scheme, Scheme):
        raise LowbitError("AWQ takes integer schemes (w4g64, w3g64 ...), not grids")
    if n_grid < 2:
        raise LowbitError(f"the alpha grid needs at least 2 points, not {n_grid}")
    fd = feeds(spec)  # a clear error before any work when the table cannot fold
    if windows.numel() < MIN_TOKENS:
        warnings.warn(f"only {windows.numel()} calibration tokens; AWQ's channel statistics need "
                      f"about {MIN_TOKENS} or more to be stable", stacklevel=2)
    layout = kv_layout(model)
    n_s = max(1, min(search_windows, windows.shape[0]))
    pick = torch.linspace(0, windows.shape[0] - 1, n_s).round().long()
    cap = capture_inputs(model, spec, windows, chunk)
    cap_s = capture_inputs(model, spec, windows[pick][:, :search_tokens], chunk)
    hidden, hidden_s = cap.hidden, cap_s.hidden
    rows: list[dict] = []
    blocks = get_blocks(model, spec)
    for bi, block in enumerate(tqdm(blocks, desc="awq blocks", disable=not progress)):
        t0 = time.perf_counter()
        firsts = [f.group[0] for f in fd]
        sums = {n: torch.zeros(get_weight(block.get_submodule(n), spec).shape[1],
                               dtype=torch.float64) for n in firsts}
        counts = dict.fromkeys(firsts, 0)

        def stat(n, x, sums=sums, counts=counts):
            x = x.reshape(-1, x.shape[-1])
            sums[n] += x.abs().sum(0, dtype=torch.float64)
            counts[n] += x.shape[0]

        nxt = _collect_inputs(block, spec, firsts, hidden, cap.kwargs, stat)
        target = _run(block, hidden_s, cap_s.kwargs)
        _check_finite(nxt, f"the output of block {bi}")
        for feed in fd:
            n = feed.group[0]
            mean_abs = (sums[n] / max(counts[n], 1)).float()
            s, info = _search_feed(block, spec, feed, mean_abs, layout, hidden_s, cap_s.kwargs,
                                   target, scheme, n_grid)
            apply_scales(block, spec, feed, s, layout)
            rows.append({"block": bi, "group": list(feed.group), "feeder": feed.source, **info})
        if clip:
            names = [n for n in spec.linears if not n.endswith(NO_CLIP)]
            xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            _collect_inputs(block, spec, names, hidden_s, cap_s.kwargs,
                            lambda n, x, xs=xs: xs[n].append(x.reshape(-1, x.shape[-1])))
            for n in names:
                x = torch.cat(xs[n])
                step = max(1, x.shape[0] // clip_tokens)
                mod = block.get_submodule(n)
                w_new, info = clip_search(get_weight(mod, spec), x[::step][:clip_tokens], scheme)
                set_weight(mod, spec, w_new)
                rows.append({"block": bi, "name": f"{spec.blocks}.{bi}.{n}", **info})
        rows.append({"block": bi, "seconds": round(time.perf_counter() - t0, 2)})
        hidden, hidden_s = nxt, target
    return rows
