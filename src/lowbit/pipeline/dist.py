"""Data-parallel calibration over processes (and machines) with ``torch.distributed``.

Every process (rank) loads the model and the recipe and takes a contiguous share of the
calibration windows. The driver runs each block on the rank's own share; before a group of
Linears is rounded its input statistics are summed over the ranks (``sync_stats``: token
counts and Hessian sums added, per-channel maxima taken, per-token maxima gathered), so each
rank sees the statistics of all windows. The rounding is then shared out (``round_shared``): a
rounder whose rows are independent (``row_separable``, on a ``stackable`` grid: GPTQ, RTN)
rounds a share of every Linear's rows on each rank and the row blocks are exchanged and joined;
otherwise rank ``i % world`` rounds the group's ``i``-th Linear and sends it to the others.
Every rank then holds the same quantized block before running its share of windows through it.
Only rank 0 writes the output.

With one process everything here is a no-op. The result equals the one-process run up to the
order of fp32 summation in the statistics (a Hessian summed per share, then across shares).
Gloo is the backend (CPU); ``torchrun`` sets the rendezvous (``MASTER_ADDR``, ``RANK``,
``WORLD_SIZE``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.weight import GridWeight
from lowbit.pipeline.stats import InputStats


def world() -> tuple[int, int]:
    """(rank, number of ranks) of this process: (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (gloo), once."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise LowbitError("this torch build has no torch.distributed")
        # a rank waits in a collective while another rounds a large Linear: minutes at most
        dist.init_process_group("gloo", timeout=timedelta(hours=2))
    return world()


def share(windows: Tensor) -> Tensor:
    """This rank's contiguous share of the calibration windows (all of them on one rank)."""
    rank, size = world()
    if size == 1:
        return windows
    n = windows.shape[0]
    if n < size:
        raise LowbitError(f"{n} calibration windows cannot be shared by {size} processes; "
                          "give at least one window per process")
    return windows[rank * n // size : (rank + 1) * n // size]


def sync_stats(st: InputStats) -> InputStats:
    """``st`` over every rank's tokens (in place): counts and sums added (the Hessian's running
    mean weighted by each rank's tokens), maxima taken, per-token maxima gathered in rank
    order."""
    rank, size = world()
    if size == 1:
        return st
    import torch.distributed as dist

    n = torch.tensor([st.n], dtype=torch.float64)
    dist.all_reduce(n)
    if st.h is not None:
        h = st.h.double().mul_(st.n)
        dist.all_reduce(h)
        st.h = h.div_(float(n)).float()
    dist.all_reduce(st.absmax, op=dist.ReduceOp.MAX)
    dist.all_reduce(st.abs_sum)
    if st.sq_sum is not None:
        dist.all_reduce(st.sq_sum)
    if st.token_absmax is not None:
        parts = [None] * size
        dist.all_gather_object(parts, st.token_absmax)
        st.token_absmax = torch.cat(parts)
    st.n = int(n)
    return st


RoundLayers = Callable[[dict[str, Tensor], dict], dict]


def round_shared(round_layers: RoundLayers, weights: dict[str, Tensor], grids: dict,
                 row_separable: bool) -> dict:
    """``round_layers(weights, grids)`` ({name: (GridWeight, info)}) with the work shared out
    over the ranks, every rank returning every result: by rows (``_by_rows``) for a rounder
    whose rows are independent on grids that keep them so (``stackable``), else by Linears
    (``_by_layers``). One process: the call itself."""
    size = world()[1]
    if size == 1:
        return round_layers(weights, grids)
    if row_separable and all(grids[n].stackable and w.shape[0] >= size
                             for n, w in weights.items()):
        return _by_rows(round_layers, weights, grids)
    return _by_layers(round_layers, weights, grids)


def _by_layers(round_layers: RoundLayers, weights: dict[str, Tensor], grids: dict) -> dict:
    """Linear ``i`` is rounded by rank ``i % world`` and broadcast from there."""
    import torch.distributed as dist

    rank, size = world()
    names = list(weights)
    mine = round_layers({n: weights[n] for i, n in enumerate(names) if i % size == rank}, grids)
    out = {}
    for i, name in enumerate(names):
        owner = i % size
        # a quantized Linear is a few MB of stored tensors: sent pickled, with its row
        box = [(mine[name][0].to_tensors(), mine[name][1])] if owner == rank else [None]
        dist.broadcast_object_list(box, src=owner)
        tensors, info = box[0]
        gw = mine[name][0] if owner == rank else GridWeight.from_tensors(
            grids[name], tuple(weights[name].shape), tensors)
        out[name] = (gw, info)
    return out


def _by_rows(round_layers: RoundLayers, weights: dict[str, Tensor], grids: dict) -> dict:
    """Rank ``r`` rounds rows ``[r m / world, (r + 1) m / world)`` of every Linear; the row
    blocks are exchanged, joined in rank order and their log rows merged (``merge_infos``)."""
    import torch.distributed as dist

    rank, size = world()
    part = {n: w[rank * w.shape[0] // size : (rank + 1) * w.shape[0] // size]
            for n, w in weights.items()}
    mine = round_layers(part, grids)
    every: list = [None] * size
    dist.all_gather_object(every, {n: (gw.to_tensors(), info, part[n].shape[0])
                                   for n, (gw, info) in mine.items()})
    out = {}
    for n, w in weights.items():
        blocks = [mine[n][0] if r == rank else GridWeight.from_tensors(
            grids[n], (every[r][n][2], w.shape[1]), every[r][n][0]) for r in range(size)]
        out[n] = (GridWeight.cat_rows(blocks),
                  merge_infos([every[r][n][1] for r in range(size)],
                              [every[r][n][2] for r in range(size)]))
    return out


def merge_infos(infos: list[dict], rows: list[int]) -> dict:
    """A Linear's log row from its row blocks' rows: ``seconds`` the longest (they ran at the
    same time), ``saturated`` (a count) summed, other numbers (per-row means: losses) weighted
    by rows, anything else the first block's."""
    out = dict(infos[0])
    total = sum(rows)
    for k in infos[0]:
        vals = [i.get(k) for i in infos]
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vals):
            continue
        if k == "seconds":
            out[k] = max(vals)
        elif k == "saturated":
            out[k] = sum(vals)
        else:
            out[k] = sum(x * r for x, r in zip(vals, rows, strict=True)) / total
    return out


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def min_over_ranks(value: int) -> int:
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)
