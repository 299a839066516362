"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support: DTensor parameters sharded on dim 0.

FISH's mask is stated over whole tensors (global flat indices, global top-k), so everything that *decides*
stays global and everything that *touches memory* goes local:

- Fisher: in forward, FSDP2 swaps each module's sharded DTensor parameter for a full (unsharded) tensor, so the
  per-sample hooks see full activations and output gradients, and gradients are taken with respect to those
  full tensors (the sharded parameters are not in the autograd graph, and no ``.grad`` is written, so FSDP's
  reduce-scatter never runs during the Fisher pass). Scores are full-size; :func:`~fish_tuning.compute_fisher`
  sums them over ranks as without FSDP, so every rank holds the same full scores and ``select_mask`` picks the
  same mask on every rank, bit for bit the single-process one.
- Masking: a rank owns rows ``[start, stop)`` of each dim-0-sharded tensor, i.e. global flat entries
  ``[start * row, stop * row)``; :func:`local_indices` keeps the kept indices in that range, shifted to the
  local shard. :class:`~fish_tuning.MaskGuard` and :class:`~fish_tuning.SparseAdamW` then work on
  :func:`local` tensors only. FSDP2 runs post-accumulate-grad hooks on the sharded parameter after its
  reduce-scatter, so the guard's gradient hook sees this rank's averaged gradient shard.
- Collectives: every FSDP2 forward and backward all-gathers, so all ranks must run the same passes. The
  Fisher pass pads a rank with fewer calibration batches with discarded passes (:func:`pass_count`) and
  agrees on every engine decision (:func:`all_agree`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dist import process_group_up
from .zero3 import is_zero3

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without DTensor: nothing can be sharded
    DTensor = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is split across ranks: a DTensor (FSDP2 ``fully_shard``, tensor
    parallel) or a DeepSpeed ZeRO-3 partition. Every forward then all-gathers, so all ranks must run the same
    passes."""
    return any(is_dtensor(p) or is_zero3(p) for p in model.parameters())


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (same storage: in-place writes reach the parameter), else ``t`` itself."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def shard_rows(p: Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` of dim 0 that this rank holds of a dim-0-sharded DTensor ``p``.

    Raises for any other layout (sharded on another dim, e.g. tensor parallel's column-wise Shard(1)): the local
    entries would not be one contiguous range of the global flat order, which the mask's indices are stated in.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    bad = [pl for pl in p.placements if isinstance(pl, Shard) and pl.dim != 0]
    if bad or p.dim() == 0:
        raise ValueError(
            f"FISH masks sharded parameters only when they are sharded on dim 0 (FSDP2 fully_shard's default); "
            f"got placements {p.placements} for a tensor of shape {tuple(p.shape)}. Use fully_shard without "
            "shard_placement_fn, or gather the parameter before masking."
        )
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape[1:]) != tuple(p.shape[1:]):  # pragma: no cover - guarded by the placement check above
        raise ValueError(f"unexpected local shape {tuple(shape)} for global shape {tuple(p.shape)}")
    return int(offset[0]), int(offset[0]) + int(shape[0])


def local_indices(indices: Tensor, p: Tensor) -> Tensor:
    """The sorted global flat ``indices`` of tensor ``p`` that fall in this rank's shard, as local flat indices.

    Plain tensors get ``indices`` unchanged. For a DTensor sharded on dim 0, entry ``j`` of the global flat order
    lies in row ``j // row`` (``row`` = entries per row); this rank holds rows ``[start, stop)``, stored
    contiguously, so its local flat index is ``j - start * row``.
    """
    if not is_dtensor(p):
        return indices
    start, stop = shard_rows(p)
    row = p[0].numel() if p.shape[0] else 0
    lo, hi = start * row, stop * row
    idx = indices.to(torch.int64)
    # indices are sorted (FishMask's invariant): the shard's entries are one slice, found by two searches
    a = int(torch.searchsorted(idx, torch.tensor(lo, dtype=torch.int64)))
    b = int(torch.searchsorted(idx, torch.tensor(hi, dtype=torch.int64)))
    return (idx[a:b] - lo).to(indices.dtype)


def all_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only if ``flag`` is True on every rank (one all-reduce of an int): ranks must take the same path."""
    if not process_group_up():
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t)
    return int(t.item()) == 0


def pass_count(mine: int, device: torch.device | str = "cpu") -> int:
    """The largest number of passes any rank has (one all-reduce): the others pad up to it."""
    if not process_group_up():
        return mine
    t = torch.tensor([mine], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def check_same_mask(fingerprint: str, device: torch.device | str = "cpu") -> None:
    """Refuse, on every rank at once, a mask that differs between ranks (one all-reduce of two int64s).

    Each rank only ever sees its own shard, so masks computed separately per rank (e.g. Fisher with
    ``distributed=False``) would silently train a different selection on each shard: no rank could notice.
    """
    if not process_group_up():
        return
    value = int(fingerprint[:15], 16)  # 60 bits of the mask's hash, fits an int64
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ValueError(
            "the FISH mask differs between ranks (fingerprint on this rank: "
            f"{fingerprint}); every rank of a sharded model must use the same mask. Compute it with "
            "compute_fisher(..., distributed=True) (the default under torchrun) so every rank gets the same scores, "
            "or select it on one rank and FishMask.load the same file everywhere."
        )
