"""The process group seen by the Fisher pass: this rank's place, and exact sums over ranks."""

from __future__ import annotations

import torch
from torch import Tensor


def dist_rank_world(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) of the default process group when summing over ranks, else (0, 1)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        distributed = initialised
    if not distributed:
        return 0, 1
    if not initialised:
        raise ValueError(
            "compute_fisher(distributed=True) needs an initialised process group: launch with torchrun / "
            "accelerate launch and call torch.distributed.init_process_group() first (or pass distributed=False)"
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def sum_over_ranks(sums: dict[str, Tensor], count: Tensor) -> Tensor:
    """Sum every rank's Fisher sums and count in place; returns the global count.

    One flat buffer (one collective, not one per tensor), reduced on rank 0 then broadcast: unlike a bare
    all-reduce, that guarantees the same bytes on every rank, so the mask (ties included) is the same everywhere.
    """
    dist = torch.distributed
    flat = torch.cat([s.reshape(-1).to(count.device) for s in sums.values()] + [count.reshape(-1)])
    dist.reduce(flat, dst=0)
    dist.broadcast(flat, src=0)
    offset = 0
    for s in sums.values():
        s.copy_(flat[offset: offset + s.numel()].view_as(s))
        offset += s.numel()
    return flat[offset:].clone()
