"""MaskGuard: the one owner of the hooks that keep masked entries bit-identical (Eq. 6).

Every masking hook in the library is registered here and nowhere else, so each has an owner with an explicit
life: :meth:`MaskGuard.attach` (or ``with guard:``) registers them, :meth:`MaskGuard.close` removes them, and a
guard bound to an optimizer closes itself when that optimizer is garbage-collected (``weakref.finalize``). A
parameter can be guarded by one guard at a time: a second guard is an error naming the first, never a silent
intersection of two masks. A process-wide optimizer step pre-hook refuses a step by any *other* optimizer over
guarded parameters (their gradients were already masked by the guard's hooks, so that step would be silently
wrong), e.g. after a Trainer run that raised before ``on_train_end``.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from .mask import FishMask
from .sharded import check_same_mask, is_dtensor, local, local_indices
from .zero3 import MasterPartitions, is_zero3, prepend_grad_hook, zero_optimizer

_ACTIVE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # guarded parameter -> its attached MaskGuard
_GLOBAL_HOOK = None


_INDEX_DTYPE: dict[str, torch.dtype] = {}


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def guard_of(param: Tensor) -> MaskGuard | None:
    """The attached guard of a parameter, if any."""
    return _ACTIVE.get(param)


def optimizer_chain(optimizer) -> list:
    """The optimizer and every optimizer it wraps (``.optimizer`` attributes: accelerate, MaskedOptimizer)."""
    out = []
    while optimizer is not None and optimizer not in out:
        out.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return out


_GENERATION = [0]  # bumped whenever a guard attaches or closes
_CLEARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> (generation, #params) it passed


def _refuse_foreign_step(optimizer, args, kwargs) -> None:
    """Global step pre-hook: an optimizer that is not a guard's owner may not step that guard's parameters.

    An optimizer that passed at the current guard generation with the same parameter count is not checked again,
    so a training step costs one dict lookup here, not a pass over every parameter."""
    if not len(_ACTIVE):
        return
    groups = getattr(optimizer, "param_groups", ())
    key = (_GENERATION[0], sum(len(g["params"]) for g in groups))
    try:
        if _CLEARED.get(optimizer) == key:
            return
    except TypeError:  # an optimizer that cannot be weakly referenced: check every time
        pass
    for group in groups:
        for p in group["params"]:
            guard = _ACTIVE.get(p)
            if guard is not None and not guard._allows(optimizer):
                raise RuntimeError(
                    f"{type(optimizer).__name__}.step() would update parameters that {guard!r} still guards: their "
                    "masked gradients were zeroed by that guard, so this step would be silently masked. That guard's "
                    "run did not end cleanly (e.g. Trainer.train raised before on_train_end). Call .close() on it "
                    "(FishCallback: callback.remove()) before training these parameters another way."
                )
    try:
        _CLEARED[optimizer] = key
    except TypeError:
        pass


def _ensure_global_hook() -> None:
    global _GLOBAL_HOOK
    if _GLOBAL_HOOK is None:
        _GLOBAL_HOOK = register_optimizer_step_pre_hook(_refuse_foreign_step)


class MaskGuard:
    """Keep the masked entries of ``mask``'s candidates bit-identical under any torch optimizer.

    Two mechanisms, both owned here:

    1. a ``post_accumulate_grad`` hook on each guarded tensor zeroes its masked gradient entries after every
       backward, so clipping, accumulation and the DDP all-reduce see Eq. 6's masked gradient;
    2. around each step of the owning optimizer (torch step pre/post hooks, or called directly by
       :class:`~fish_tuning.MaskedOptimizer`), candidate tensors are backed up and masked entries written back,
       which undoes decoupled weight decay, momentum and any other rule that moves zero-gradient entries.

    Candidates excluded from selection (``mask.frozen``) are guarded with nothing kept: they never change.
    Under ``torch.distributed`` with more than one rank (DDP, FSDP2, ZeRO), construction is a collective (one
    all-reduce) that refuses a mask differing between ranks, so build the guard (or its optimizer) on every rank.
    FSDP2 (DTensor parameters sharded on dim 0): each rank guards its own shard with the kept indices that fall in
    it (FSDP2 runs the gradient hook on the reduce-scattered shard).
    DeepSpeed ZeRO 1-3 (attach to the engine's optimizer, e.g. ``engine.optimizer``): the gradient hook zeroes
    masked entries of the full gradient in backward, before ZeRO's reduce-scatter, and the step hooks sit on the
    torch optimizer ZeRO wraps and act on this rank's fp32 master slices (see :mod:`fish_tuning.zero3`).
    Nothing is registered until :meth:`attach` (or ``with MaskGuard(...) as g:``), and :meth:`close` removes it all.

    Args:
        params: the tensors to guard (e.g. an optimizer's parameters); default every trainable parameter of
            ``model``. Each must be a candidate, an excluded candidate or ``always_train`` (those train freely).
        optimizer: the optimizer to attach to on ``with`` (same as ``attach(optimizer)``).
        restore: back up and write back masked entries around steps (off when the optimizer never writes them,
            as :class:`~fish_tuning.SparseAdamW`).
    """

    def __init__(self, mask: FishMask, model: nn.Module, params: Iterable[Tensor] | None = None,
                 optimizer: torch.optim.Optimizer | None = None, restore: bool = True):
        mask.check(model)
        self.mask, self.restore, self._optimizer = mask, restore, optimizer
        named = dict(model.named_parameters())
        for name, idx in mask.indices.items():
            if idx.numel() and not named[name].requires_grad:
                raise ValueError(
                    f"mask candidate '{name}' keeps {idx.numel()} entries but does not require grad, so they would "
                    "never train. Set requires_grad=True on it before building the optimizer, or select the mask "
                    "without it (select_mask(..., exclude=...) / FishCallback(exclude=...))."
                )
        name_of = {id(p): n for n, p in named.items()}
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        params = list(params)
        self._param_ids = frozenset(id(p) for p in params)  # what a stepping optimizer may hold (see before_step)
        self.kept: dict[Tensor, Tensor] = {}  # guarded tensor -> its kept flat indices
        self.names: dict[Tensor, str] = {}
        frozen = set(mask.frozen)
        for p in params:
            name = name_of.get(id(p))
            if name is None:
                raise ValueError("the optimizer holds a tensor that is not a parameter of the model given")
            if p in self.kept:
                continue
            if name in mask.shapes:
                # under FSDP2 only this rank's shard: the kept indices that fall in it, shifted to local positions
                self.kept[p] = local_indices(mask.indices[name], p).to(device=p.device, dtype=index_dtype(p.device))
            elif name in frozen:
                self.kept[p] = torch.zeros(0, dtype=index_dtype(p.device), device=p.device)
            elif not mask.is_always_train(name):
                raise ValueError(
                    f"parameter '{name}' is in the optimizer but is neither a mask candidate nor always_train. "
                    "Add it to select_mask(..., always_train=...) or leave it out of the optimizer."
                )
            else:
                continue
            self.names[p] = name
        sharded = [p for p in self.kept if is_dtensor(p) or is_zero3(p)]
        if sharded or (self.kept and _world_size() > 1):
            # each rank masks its own copy or shard: masks that differ per rank (selected separately) would make
            # DDP replicas or shards silently diverge, so every rank builds its guard and checks here (1 all-reduce)
            check_same_mask(mask.fingerprint(), (sharded or list(self.kept))[0].device)
        self._tap: list = [None]  # f(param, grad) called before masking (a refresh's gradient window), or None
        self._zero3 = [p for p in self.kept if is_zero3(p)]
        self._parts: MasterPartitions | None = None  # ZeRO-3: where the fp32 masters live (set by attach)
        self._local: dict[Tensor, Tensor] = {}  # ZeRO-3: kept positions within this rank's master slice
        self._dense: dict[Tensor, Tensor] = {}  # lazily built bool masks (True = must not change)
        self._backup: dict[Tensor, Tensor] = {}
        self._handles: list = []
        self._pending = False  # True between before_step and after_step: a step that raised is undone next time
        self._owner: weakref.ref | None = None
        self._finalizer: weakref.finalize | None = None
        self.attached = False

    # ------------------------------------------------------------------ life
    def attach(self, optimizer: torch.optim.Optimizer | None = None, step_hooks: bool = True) -> MaskGuard:
        """Register the gradient hooks, and with ``optimizer`` the step hooks on it; returns ``self``.

        The guard is then owned by ``optimizer``: it closes when the optimizer is garbage-collected, and no other
        optimizer may step the guarded tensors while it is attached.
        """
        if self.attached:
            raise RuntimeError(f"{self!r} is already attached; close() it first")
        optimizer = optimizer if optimizer is not None else self._optimizer
        stepped = [optimizer] if optimizer is not None else []
        zero = zero_optimizer(optimizer) if optimizer is not None else None
        if self._zero3 and zero is None:
            raise ValueError("these parameters are partitioned by DeepSpeed ZeRO-3: attach the guard to the ZeRO "
                             "optimizer (engine.optimizer, or the Trainer's optimizer), which owns the fp32 master "
                             "weights that must be kept")
        if zero is not None:  # DeepSpeed ZeRO (1, 2 or 3): the masters that matter are ZeRO's fp32 partitions
            managed = list(self.kept)  # (that every rank holds the same mask was checked when the guard was built)
            self._parts = MasterPartitions(zero, managed)
            self._local = {p: self._parts.local_indices(p, self.kept[p].long()) for p in managed}
            optimizer, stepped = zero, self._parts.torch_optimizers()
        self._check_free()
        _ensure_global_hook()
        for p in self.kept:
            # ZeRO-3: before ZeRO's reduce-scatter hook, so the reduced partitions and the clipping norm see Eq. 6
            register = prepend_grad_hook if p in self._local else type(p).register_post_accumulate_grad_hook
            # the hook reads self.kept at each call, so a refresh (set_kept) changes what it keeps in place
            self._handles.append(register(p, _keep_only(self.kept, self._tap)))
            _ACTIVE[p] = self
        _GENERATION[0] += 1
        self.attached = True
        if optimizer is not None:
            self._owner = weakref.ref(optimizer)
            self._finalizer = weakref.finalize(optimizer, MaskGuard._close_handles, self._handles, list(self.kept))
            if step_hooks:
                self.hook_steps(*stepped)
        return self

    def hook_steps(self, *optimizers: torch.optim.Optimizer) -> None:
        """Run :meth:`before_step` / :meth:`after_step` around every step of these optimizers (removed by close).

        :class:`~fish_tuning.MaskedOptimizer` hooks the optimizer it wraps, so a direct ``wrapped.step()`` is
        guarded as well."""
        for opt in optimizers:
            self._handles.append(opt.register_step_pre_hook(lambda o, *_: self.before_step(o)))
            self._handles.append(opt.register_step_post_hook(lambda *_: self.after_step()))

    def close(self) -> None:
        """Remove every hook this guard registered; the tensors then train without the mask. Idempotent."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.after_step()  # a step that raised part-way and was never retried: put its masked entries back
        MaskGuard._close_handles(self._handles, list(self.kept))
        self._backup.clear()
        self._pending = False
        self.attached = False

    remove = close  # the name of 0.1

    @staticmethod
    def _close_handles(handles: list, params: list[Tensor]) -> None:
        # Static (no reference to the guard) so weakref.finalize does not keep the guard alive.
        for handle in handles:
            handle.remove()
        handles.clear()
        for p in params:
            if p in _ACTIVE:
                del _ACTIVE[p]
        _GENERATION[0] += 1

    def __enter__(self) -> MaskGuard:
        return self if self.attached else self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_free(self) -> None:
        taken = [(p, _ACTIVE[p]) for p in self.kept if p in _ACTIVE and _ACTIVE[p] is not self]
        if taken:
            gc.collect()  # an unreachable owner (reference cycle) closes its guard through its finalizer
            taken = [(p, _ACTIVE[p]) for p in self.kept if p in _ACTIVE and _ACTIVE[p] is not self]
        if taken:
            p, other = taken[0]
            raise RuntimeError(
                f"parameter '{self.names[p]}' is already guarded by {other!r}; two masks on one tensor would train "
                "only their intersection. Close the first guard (optimizer.close(), callback.remove(), or drop that "
                "optimizer) before attaching another."
            )

    def _allows(self, optimizer) -> bool:
        owner = self._owner() if self._owner is not None else None
        if self._owner is None:
            return True  # gradient hooks only (no owner): any optimizer may step
        if owner is None:
            return True  # owner gone; its finalizer is about to close this guard
        return owner in optimizer_chain(optimizer) or optimizer in optimizer_chain(owner)

    # ------------------------------------------------------------------ the step
    def _target(self, p: Tensor) -> Tensor:
        """What the optimizer writes for ``p`` on this rank: the tensor, its FSDP2 shard, or its ZeRO-3 fp32 master."""
        return self._parts.master(p) if p in self._local else local(p)

    def _frozen(self, p: Tensor) -> Tensor:
        dense = self._dense.get(p)
        if dense is None or dense.device != self._target(p).device:  # built lazily; again after model.to(device)
            shard = self._target(p)
            dense = torch.ones(shard.numel(), dtype=torch.bool, device=shard.device)
            dense[self._local.get(p, self.kept[p]).long().to(dense.device)] = False
            dense = self._dense[p] = dense.view(shard.shape)
        return dense

    def _check_params(self, optimizer) -> None:
        """Refuse a step over tensors this guard never saw (a group added after it was built would train them
        densely). ZeRO steps its own flat fp32 partitions, so the check applies to plain and FSDP2 optimizers."""
        if self._parts is not None:
            return
        for group in getattr(optimizer, "param_groups", ()):
            for p in group["params"]:
                if id(p) not in self._param_ids:
                    raise RuntimeError(
                        f"{type(optimizer).__name__}.step() would update a tensor of shape {tuple(p.shape)} that "
                        f"{self!r} was not built with (a parameter group added afterwards, by add_param_group or "
                        "param_groups.append): its masked entries would train. Put every parameter in the optimizer "
                        "before wrapping it or attaching the mask."
                    )

    @torch.no_grad()
    def before_step(self, optimizer=None) -> None:
        """Zero masked gradients (also ones set by hand, not through backward) and back up guarded tensors.

        ``optimizer``: the one about to step; it may hold only the tensors this guard was built with. If the last
        step raised part-way (``after_step`` never ran), what it moved is put back first."""
        if self._pending:
            self.after_step()
        if optimizer is not None:
            self._check_params(optimizer)
        for p in self.kept:
            if p in self._local:  # ZeRO-3: the reduced fp32 gradient slice (already masked in backward)
                grad = self._parts.grad(p)
                if grad is not None:
                    grad.masked_fill_(self._frozen(p), 0)
            elif p.grad is not None:
                _keep_only(self.kept, [None])(p)
            if self.restore:
                target = self._target(p)
                buf = self._backup.get(p)
                if buf is None or buf.dtype != target.dtype or buf.device != target.device:
                    # again after model.to(dtype / device): where(..., out=target) needs the target's dtype
                    buf = self._backup[p] = torch.empty_like(target)
                buf.copy_(target)
        self._pending = self.restore

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the backed-up value of every masked entry back (undoes weight decay, momentum, ...)."""
        if not self._pending:
            return
        self._pending = False
        for p in self.kept:
            shard = self._target(p)
            torch.where(self._frozen(p), self._backup[p], shard, out=shard)

    # ------------------------------------------------------------------ a mask that moves (fish_tuning.refresh)
    def check_movable(self) -> None:
        """Refuse a mask that moves where kept indices are per-shard or per-partition (FSDP2, ZeRO)."""
        if self._local or any(is_dtensor(p) for p in self.kept):
            raise NotImplementedError("a mask that moves is supported on one process and DDP; under FSDP2 or "
                                      "DeepSpeed ZeRO train with a fixed mask (no refresh)")

    def set_kept(self, p: Tensor, idx: Tensor) -> None:
        """Train ``idx`` (sorted flat indices) of ``p`` from the next backward on (the caller sets ``self.mask``)."""
        self.kept[p] = idx.to(device=p.device, dtype=index_dtype(p.device))
        self._dense.pop(p, None)

    def set_tap(self, tap) -> None:
        """``tap(param, grad)`` sees every guarded gradient before its masked entries are zeroed (None: off)."""
        self._tap[0] = tap

    def state_bytes(self) -> int:
        """Bytes this guard keeps beside the model: kept indices, dense masks and step backups."""
        tensors = [*self.kept.values(), *self._dense.values(), *self._backup.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        owner = self._owner() if self._owner is not None else None
        by = f", owned by {type(owner).__name__} at {id(owner):#x}" if owner is not None else ""
        state = "attached" if self.attached else "detached"
        return f"MaskGuard(k={self.mask.num_selected:,}, {len(self.kept)} tensors, {state}{by}, id {id(self):#x})"


def _keep_only(kept: dict[Tensor, Tensor], tap: list):
    """Zero every gradient entry except the kept ones (``kept[p]``) without a dense mask: gather k, zero, scatter k
    back. ``tap[0]``, when set, sees the whole gradient first."""

    def hook(p: Tensor) -> None:
        if p.grad is None:
            return
        if tap[0] is not None:
            tap[0](p, p.grad)
        idx = kept[p]
        if is_dtensor(p.grad):  # FSDP2: this rank's shard of the reduce-scattered gradient; idx is local
            grad = local(p.grad)
            if not grad.is_contiguous():
                raise RuntimeError("MaskGuard: the local shard of a sharded gradient is not contiguous; FISH masks "
                                   "FSDP2 parameters sharded on dim 0 only (fully_shard's default)")
        else:
            if not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            grad = p.grad
        flat = grad.view(-1)
        index = idx if idx.device == flat.device else idx.to(flat.device)
        values = flat.index_select(0, index)
        flat.zero_()
        flat.index_put_((index,), values)

    return hook
