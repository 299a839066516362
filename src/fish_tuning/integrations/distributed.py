"""Calibration samples for the Fisher pass, the same set whether one process or W ranks read them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..checks import positive_int
from ..dist import dist_rank_world


def calibration_indices(
    dataset_size: int, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1
) -> list[int]:
    """This rank's share of a seeded random subset of ``num_samples`` dataset indices.

    The subset depends only on ``(dataset_size, num_samples, seed)``; rank r gets its entries r, r + W, ...
    That is exactly the split :func:`~fish_tuning.compute_fisher` expects with ``distributed`` on (global
    ``num_samples``, sample i of the union on rank i % W), so the ranks together score the single-process set.
    """
    if dataset_size <= 0:
        raise ValueError("the calibration dataset is empty: pass the training dataset (or a non-empty subset)")
    num_samples = positive_int(num_samples, "num_samples")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))[:num_samples]
    return order[rank::world_size].tolist()


def calibration_loader(
    dataset: Dataset,
    num_samples: int = 128,
    batch_size: int = 8,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    seed: int = 0,
    distributed: bool | None = None,
) -> DataLoader:
    """A DataLoader over this rank's calibration samples (see :func:`calibration_indices`).

    Iterating it draws nothing from the global RNG (the loader has its own seeded generator), so computing Fisher
    does not change the data order or dropout of the training that follows. ``distributed`` follows
    :func:`~fish_tuning.compute_fisher`: by default the ranks of an initialised process group share the samples.
    """
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            "calibration_loader needs a dataset with a length (map-style); for a streaming / IterableDataset, "
            "take num_samples examples yourself and pass the batches to compute_fisher"
        )
    rank, world = dist_rank_world(distributed)
    idx = calibration_indices(len(dataset), num_samples, seed=seed, rank=rank, world_size=world)
    return DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed))
