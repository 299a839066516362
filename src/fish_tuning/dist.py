"""The default process group: whether one is up, this rank's place in it, and exact sums over ranks."""

from __future__ import annotations

import torch
from torch import Tensor


def process_group_up() -> bool:
    """Whether a default process group is initialised (torchrun / accelerate launch, after init_process_group)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Ranks in the default process group; 1 without one."""
    return torch.distributed.get_world_size() if process_group_up() else 1


def dist_rank_world(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) of the default process group when summing over ranks, else (0, 1)."""
    initialised = process_group_up()
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
