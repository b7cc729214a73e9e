"""The collectives the parallel model uses; each is a no-op for a group of one (or no group).

Tensors are reduced in their own dtype; sums are exact up to floating-point summation order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """Ranks in ``group`` (1 for None = single process)."""
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum ``t`` over ``group`` in place and return it."""
    if group_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def all_gather_cat(t: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``t`` (same shape on all) along ``dim``, in rank order."""
    n = group_size(group)
    if n == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim)


def all_gather_rows(t: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's rows (``t`` [n_r, ...], n_r may differ, 0 allowed) in rank order.

    Returns (rows [sum n_r, ...], [n_r per rank]); pads to the largest n_r for the transfer.
    """
    n = group_size(group)
    if n == 1:
        return t, [t.shape[0]]
    size = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.empty_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    m = max(counts)
    pad = t.new_zeros((m, *t.shape[1:]))
    pad[: t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in range(n)]
    dist.all_gather(parts, pad, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]), counts


def broadcast_object(obj, group, src: int = 0):
    """``obj`` of rank ``src`` on every rank of ``group`` (pickled; CPU control messages)."""
    if group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
