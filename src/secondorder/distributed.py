"""``torch.distributed`` support: statistics averaged across ranks, factor work spread over ranks.

With DDP each rank computes its minibatch statistics on ``m/N`` examples; averaging them with
:func:`all_reduce_mean` gives exactly the statistics of one process with batch ``m`` (every
statistic in the library is a mean over examples). Expensive per-layer work (inverses, roots,
BFGS updates) is assigned to one owner rank per layer by :func:`assign_owners` and the results
are sent to every rank with :func:`broadcast_from_owners`. Without an initialised process
group (or with one rank) every function here is a no-op, so single-process code pays nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """In place: replace each tensor by its mean over ranks (one flat all-reduce)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_gather_examples(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Every rank's tensors concatenated along dim 0 (the examples), in rank order.

    Ranks may hold different numbers of rows (the trailing dimensions must agree): the row
    counts are exchanged first and the tensors padded to the largest count for the gather.
    Without a process group the tensors are returned as they are.
    """
    if not is_distributed() or not tensors:
        return list(tensors)
    world = dist.get_world_size()
    ref = tensors[0]
    # per tensor: rows, number of dimensions, entries per row (checked on every rank alike)
    info = torch.tensor(
        [[t.shape[0], t.dim(), t.shape[1:].numel()] for t in tensors], dtype=torch.int64, device=ref.device
    )
    all_info = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(all_info, info)
    table = torch.stack(all_info).tolist()  # [rank][tensor][rows, dim, per-row]
    for r in range(world):
        for i in range(len(tensors)):
            if table[r][i][1:] != table[0][i][1:]:
                raise ValueError(
                    f"all_gather_examples: tensor {i} has {table[r][i][1]} dimensions and "
                    f"{table[r][i][2]} entries per row on rank {r}, but {table[0][i][1]} and "
                    f"{table[0][i][2]} on rank 0; only the first dimension may differ"
                )
    out = []
    for i, t in enumerate(tensors):
        rows = [table[r][i][0] for r in range(world)]
        longest = max(rows)
        padded = t.contiguous()
        if t.shape[0] < longest:
            padded = torch.cat([padded, t.new_zeros(longest - t.shape[0], *t.shape[1:])])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)]))
    return out


def assign_owners(costs: Mapping[str, float]) -> dict[str, int]:
    """Greedy longest-processing-time assignment of named work items to ranks."""
    n = world_size()
    load = [0.0] * n
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(range(n), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += costs[name]
    return owners


def broadcast_from_owners(items: Mapping[str, Sequence[Tensor]], owners: Mapping[str, int]) -> None:
    """In place: every tensor of ``items[name]`` takes the value it has on rank ``owners[name]``."""
    if not is_distributed():
        return
    for name in sorted(items):
        for t in items[name]:
            dist.broadcast(t, src=owners[name])
