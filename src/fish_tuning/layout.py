"""Where a masked tensor's kept entries live on this rank: one small class per storage layout.

A :class:`~fish_tuning.FishMask` states its kept entries as sorted global flat indices of whole tensors. What a
rank actually touches is one of three layouts, each answering the same questions (which gradient entries to keep
in backward, which tensor the optimizer writes, which of its entries must not change), so that
:class:`~fish_tuning.MaskGuard` and :class:`~fish_tuning.SparseAdamW` never ask which layout a tensor has:

- :class:`Layout`: a plain tensor (one process, DDP): gradient, parameter and indices are all whole.
- :class:`ShardLayout`: an FSDP2 DTensor sharded on dim 0 (:mod:`fish_tuning.sharded`): the rank holds a contiguous
  range of rows, its gradient hook sees the reduce-scattered shard, and the optimizer writes that shard.
- :class:`MasterLayout`: DeepSpeed ZeRO 1-3 (:mod:`fish_tuning.zero3`): backward gives the full gradient (masked
  with the global indices before ZeRO's own reduce-scatter hook), the step writes this rank's slice of the fp32
  master flat.

:class:`LocalMask` holds one layout object per masked tensor: what a guard and an optimizer read indices from.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .dist import world_size
from .mask import FishMask
from .sharded import check_same_mask, is_dtensor, local, local_indices
from .zero3 import MasterPartitions, is_zero3, prepend_grad_hook

_INDEX_DTYPE: dict[str, torch.dtype] = {}


def index_dtype(device: torch.device | str) -> torch.dtype:
    """int32 indices where this device's index_select/index_put_ accept them (half the bytes of int64)."""
    key = str(device)
    if key not in _INDEX_DTYPE:
        try:
            probe = torch.zeros(4, device=device)
            idx = torch.tensor([1, 3], dtype=torch.int32, device=device)
            probe.index_put_((idx,), probe.index_select(0, idx) + 1)
            ok = bool(probe[1] == 1)
        except (RuntimeError, NotImplementedError):
            ok = False
        _INDEX_DTYPE[key] = torch.int32 if ok else torch.int64
    return _INDEX_DTYPE[key]


class Layout:
    """A plain tensor: the kept entries are the mask's indices themselves.

    ``index``: the kept flat positions in the gradient backward produces and in the tensor the step writes.
    """

    movable = True  # a moving mask (fish_tuning.refresh) needs global indices on one tensor

    def __init__(self, param: Tensor, indices: Tensor):
        self.param = param
        self.index = self._place(indices)
        self._masked: Tensor | None = None

    def _place(self, indices: Tensor) -> Tensor:
        return indices.to(device=self.param.device, dtype=index_dtype(self.param.device))

    def set(self, indices: Tensor) -> None:
        """Keep ``indices`` (sorted global flat) from now on."""
        self.index = self._place(indices)
        self._masked = None

    # ------------------------------------------------------------------ backward
    def register_grad_hook(self, hook):
        return self.param.register_post_accumulate_grad_hook(hook)

    def _grad(self) -> Tensor:
        """The gradient backward produced, contiguous (its flat view is what the indices address)."""
        if not self.param.grad.is_contiguous():
            self.param.grad = self.param.grad.contiguous()
        return self.param.grad

    def keep_grad(self) -> None:
        """Zero every gradient entry except the kept ones without a dense mask: gather k, zero, scatter k back."""
        if self.param.grad is None:
            return
        flat = self._grad().view(-1)
        index = self.index if self.index.device == flat.device else self.index.to(flat.device)
        values = flat.index_select(0, index)
        flat.zero_()
        flat.index_put_((index,), values)

    # ------------------------------------------------------------------ the step
    def target(self) -> Tensor:
        """What the optimizer writes for this tensor on this rank."""
        return self.param

    def step_index(self) -> Tensor:
        """The kept positions in :meth:`target`."""
        return self.index

    def mask_step_grad(self) -> None:
        """Zero the masked entries of the gradient the step reads (also one set by hand, not through backward)."""
        self.keep_grad()

    def masked(self) -> Tensor:
        """Bool over :meth:`target`, True where the entry must not change (built lazily; again after ``.to``)."""
        target = self.target()
        if self._masked is None or self._masked.device != target.device:
            dense = torch.ones(target.numel(), dtype=torch.bool, device=target.device)
            dense[self.step_index().long().to(dense.device)] = False
            self._masked = dense.view(target.shape)
        return self._masked

    def nbytes(self) -> int:
        """Bytes of kept indices and the dense mask (once built)."""
        return sum(t.numel() * t.element_size() for t in (self.index, self._masked) if t is not None)


class ShardLayout(Layout):
    """An FSDP2 DTensor sharded on dim 0: ``index`` holds the kept entries in this rank's rows, as local positions
    (FSDP2 runs the gradient hook on the reduce-scattered shard, and the optimizer steps the local shard)."""

    movable = False

    def _place(self, indices: Tensor) -> Tensor:
        return super()._place(local_indices(indices, self.param))

    def _grad(self) -> Tensor:
        grad = local(self.param.grad)
        if not grad.is_contiguous():
            raise RuntimeError("MaskGuard: the local shard of a sharded gradient is not contiguous; FISH masks "
                               "FSDP2 parameters sharded on dim 0 only (fully_shard's default)")
        return grad

    def target(self) -> Tensor:
        return local(self.param)


class MasterLayout(Layout):
    """DeepSpeed ZeRO 1-3: the full gradient is masked in backward with the global ``index``, before ZeRO's
    reduce-scatter hook (so the reduced partitions and the clipping norm see Eq. 6); the step writes this rank's
    slice of the fp32 master flat, whose kept positions are :meth:`step_index`."""

    movable = False

    def __init__(self, param: Tensor, indices: Tensor, parts: MasterPartitions):
        super().__init__(param, indices)
        self.parts = parts
        self._step_index = parts.local_indices(param, self.index.long())

    def register_grad_hook(self, hook):
        return prepend_grad_hook(self.param, hook)

    def target(self) -> Tensor:
        return self.parts.master(self.param)

    def step_index(self) -> Tensor:
        return self._step_index

    def mask_step_grad(self) -> None:
        grad = self.parts.grad(self.param)  # the reduced fp32 gradient slice (already masked in backward)
        if grad is not None:
            grad.masked_fill_(self.masked(), 0)


class LocalMask:
    """This rank's kept entries of ``mask`` for ``params`` (default: every trainable parameter of ``model``): one
    layout object per masked tensor (a candidate, or an excluded candidate with nothing kept); ``always_train``
    tensors train freely and get none.

    Under ``torch.distributed`` with more than one rank (DDP, FSDP2, ZeRO), construction is a collective (one
    all-reduce) that refuses a mask differing between ranks: each rank only sees its own copy or shard.
    """

    def __init__(self, mask: FishMask, model: nn.Module, params: Iterable[Tensor] | None = None):
        mask.check(model)
        self.mask = mask
        named = dict(model.named_parameters())
        for name, idx in mask.indices.items():
            if idx.numel() and not named[name].requires_grad:
                raise ValueError(
                    f"mask candidate '{name}' keeps {idx.numel()} entries but does not require grad, so they would "
                    "never train. Set requires_grad=True on it before building the optimizer, or select the mask "
                    "without it (select_mask(..., exclude=...) / FishCallback(exclude=...))."
                )
        name_of = {id(p): n for n, p in named.items()}
        params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        self.param_ids = frozenset(id(p) for p in params)  # what a stepping optimizer may hold
        self.entries: dict[Tensor, Layout] = {}
        self.names: dict[Tensor, str] = {}
        excluded = set(mask.excluded)
        for p in params:
            name = name_of.get(id(p))
            if name is None:
                raise ValueError("the optimizer holds a tensor that is not a parameter of the model given")
            if p in self.entries:
                continue
            if name in mask.shapes:
                indices = mask.indices[name]
            elif name in excluded:
                indices = torch.zeros(0, dtype=torch.int64)
            elif not mask.is_always_train(name):
                raise ValueError(
                    f"parameter '{name}' is in the optimizer but is neither a mask candidate nor always_train. "
                    "Add it to select_mask(..., always_train=...) or leave it out of the optimizer."
                )
            else:
                continue
            self.entries[p] = (ShardLayout if is_dtensor(p) else Layout)(p, indices)
            self.names[p] = name
        sharded = [p for p in self.entries if is_dtensor(p) or is_zero3(p)]
        self.zero3 = any(is_zero3(p) for p in sharded)
        if sharded or (self.entries and world_size() > 1):
            # masks that differ per rank (selected separately) would make DDP replicas or shards silently diverge
            check_same_mask(mask.fingerprint(), (sharded or list(self.entries))[0].device)

    def on_master_partitions(self, zero_opt) -> MasterPartitions:
        """Step ZeRO's fp32 master slices from now on (DeepSpeed ZeRO 1-3: what its optimizer writes)."""
        parts = MasterPartitions(zero_opt, list(self.entries))
        self.entries = {p: MasterLayout(p, e.index, parts) for p, e in self.entries.items()}
        return parts

    @property
    def movable(self) -> bool:
        return all(e.movable for e in self.entries.values())

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries.values())
