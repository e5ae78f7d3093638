"""Data-parallel calibration over processes (and machines) with ``torch.distributed``.

Every process (rank) loads the model and the recipe and takes a contiguous share of the
calibration windows. The driver runs each block on the rank's own share; before a group of
Linears is rounded its input statistics are summed over the ranks (``sync_stats``: token
counts and Hessian sums added, per-channel maxima taken, per-token maxima gathered), so each
rank sees the statistics of all windows. The rounding is then shared out: a rounder whose rows
are independent (``row_separable``, on a ``stackable`` grid: GPTQ, RTN) rounds a share of every
Linear's rows on each rank and the row blocks are exchanged and joined (``share_rows``);
otherwise rank ``i % world`` rounds the group's ``i``-th Linear and sends it to the others
(``share_rounding``). Every rank then holds the same quantized block before running its share
of windows through it. Only rank 0 writes the output.

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


def share_rows(names: list[str], rows: dict[str, int],
               round_slices: Callable[[dict[str, slice]], dict],
               to_tensors: Callable[[object], dict[str, Tensor]],
               from_tensors: Callable[[str, dict[str, Tensor], int], object],
               cat: Callable[[list], object]) -> dict:
    """Round every Linear of ``names`` by rows across the ranks: rank ``r`` rounds rows
    ``[r m / world, (r + 1) m / world)`` of each (``round_slices({name: slice})`` gives
    {name: (weight, info)}), the parts are exchanged and joined in rank order (``cat``), and
    the parts' log rows merged (``merge_infos``). Every rank returns the whole weights."""
    rank, size = world()
    import torch.distributed as dist

    slices = {n: slice(rank * rows[n] // size, (rank + 1) * rows[n] // size) for n in names}
    mine = round_slices(slices)
    payload = {n: (to_tensors(w), info, slices[n].stop - slices[n].start)
               for n, (w, info) in mine.items()}
    every: list = [None] * size
    dist.all_gather_object(every, payload)
    out = {}
    for n in names:
        parts = [mine[n][0] if r == rank else from_tensors(n, every[r][n][0], every[r][n][2])
                 for r in range(size)]
        out[n] = (cat(parts), merge_infos([every[r][n][1] for r in range(size)],
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
