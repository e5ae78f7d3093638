"""Data-parallel calibration over processes (and machines) with ``torch.distributed``.

Every process (rank) loads the model and the recipe and takes a contiguous share of the
calibration windows. The driver runs each block on the rank's own share; before a group of
Linears is rounded its input statistics are summed over the ranks (``sync_stats``: token
counts and Hessian sums added, per-channel maxima taken, per-token maxima gathered), so each
rank sees the statistics of all windows. The Linears of a group are then shared out: rank
``i % world`` rounds the group's ``i``-th Linear and sends the result (``GridWeight`` tensors
and its log row) to the others (``share_rounding``), so every rank holds the same quantized
block before running its share through it. Only rank 0 writes the output.

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
    if st.token_absmax is not None:
        parts = [None] * size
        dist.all_gather_object(parts, st.token_absmax)
        st.token_absmax = torch.cat(parts)
    st.n = int(n)
    return st


def share_rounding(names: list[str], round_some: Callable[[list[str]], dict],
                   to_tensors: Callable[[object], dict[str, Tensor]],
                   from_tensors: Callable[[str, dict[str, Tensor]], object]) -> dict:
    """Round ``names`` across the ranks: ``round_some(subset)`` gives {name: (weight, info)}
    for this rank's part (name ``i`` is rank ``i % world``'s); each result is broadcast from
    its owner (``to_tensors`` / ``from_tensors`` move a weight) and every rank returns all of
    them."""
    rank, size = world()
    if size == 1:
        return round_some(names)
    import torch.distributed as dist

    mine = round_some([n for i, n in enumerate(names) if i % size == rank])
    out = {}
    for i, name in enumerate(names):
        owner = i % size
        # a quantized Linear is a few MB of stored tensors: sent pickled, with its row
        box = [(to_tensors(mine[name][0]), mine[name][1])] if owner == rank else [None]
        dist.broadcast_object_list(box, src=owner)
        tensors, info = box[0]
        out[name] = (mine[name][0] if owner == rank else from_tensors(name, tensors), info)
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
