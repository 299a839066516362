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

from .layout import Layout, LocalMask
from .mask import FishMask
from .zero3 import zero_optimizer

_ACTIVE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # guarded parameter -> its attached MaskGuard
_GLOBAL_HOOK = None


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
                    "(FishCallback: callback.close()) before training these parameters another way."
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

    Candidates excluded from selection (``mask.excluded``) are guarded with nothing kept: they never change.
    Under ``torch.distributed`` with more than one rank (DDP, FSDP2, ZeRO), construction is a collective (one
    all-reduce) that refuses a mask differing between ranks, so build the guard (or its optimizer) on every rank.
    Where each tensor's kept entries live on this rank is :mod:`fish_tuning.layout`'s business (a plain tensor,
    an FSDP2 shard, a ZeRO fp32 master slice); the guard asks every tensor the same questions. Under DeepSpeed
    ZeRO 1-3 attach it to the engine's optimizer (e.g. ``engine.optimizer``): the step hooks then sit on the torch
    optimizer ZeRO wraps.
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
        self._build(LocalMask(mask, model, params), optimizer, restore)

    @classmethod
    def over(cls, local_mask: LocalMask, restore: bool = True) -> MaskGuard:
        """A guard over kept entries already laid out (an optimizer that reads the same indices, so that a moving
        mask reaches both)."""
        guard = cls.__new__(cls)
        guard._build(local_mask, None, restore)
        return guard

    def _build(self, local_mask: LocalMask, optimizer, restore: bool) -> None:
        self.mask, self.restore, self._optimizer = local_mask.mask, restore, optimizer
        self.local_mask = local_mask  # guarded tensor -> where its kept entries live (fish_tuning.layout)
        self._tap: list = [None]  # f(param, grad) called before masking (a refresh's gradient window), or None
        self._backup: dict[Tensor, Tensor] = {}
        self._handles: list = []
        self._pending = False  # True between before_step and after_step: a step that raised is undone next time
        self._zero = False  # stepping ZeRO's own fp32 partitions (set by attach)
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
        if self.local_mask.zero3 and zero is None:
            raise ValueError("these parameters are partitioned by DeepSpeed ZeRO-3: attach the guard to the ZeRO "
                             "optimizer (engine.optimizer, or the Trainer's optimizer), which owns the fp32 master "
                             "weights that must be kept")
        if zero is not None:  # DeepSpeed ZeRO (1, 2 or 3): the masters that matter are ZeRO's fp32 partitions
            parts = self.local_mask.on_master_partitions(zero)
            self._zero = True
            optimizer, stepped = zero, parts.torch_optimizers()
        self._check_free()
        _ensure_global_hook()
        for p, entry in self.local_mask.entries.items():
            # the hook reads the entry's indices at each call, so a refresh (set_kept) changes what it keeps
            self._handles.append(entry.register_grad_hook(_grad_hook(entry, self._tap)))
            _ACTIVE[p] = self
        _GENERATION[0] += 1
        self.attached = True
        if optimizer is not None:
            self._owner = weakref.ref(optimizer)
            self._finalizer = weakref.finalize(optimizer, MaskGuard._close_handles, self._handles,
                                               list(self.local_mask.entries))
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
        MaskGuard._close_handles(self._handles, list(self.local_mask.entries))
        self._backup.clear()
        self._pending = False
        self.attached = False

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
        def taken():
            return [(p, _ACTIVE[p]) for p in self.local_mask.entries if p in _ACTIVE and _ACTIVE[p] is not self]

        if taken():
            gc.collect()  # an unreachable owner (reference cycle) closes its guard through its finalizer
        if taken():
            p, other = taken()[0]
            raise RuntimeError(
                f"parameter '{self.local_mask.names[p]}' is already guarded by {other!r}; two masks on one tensor would train "
                "only their intersection. Close the first guard (optimizer.close(), callback.close(), or drop that "
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
    def _check_params(self, optimizer) -> None:
        """Refuse a step over tensors this guard never saw (a group added after it was built would train them
        densely). ZeRO steps its own flat fp32 partitions, so the check applies to plain and FSDP2 optimizers."""
        if self._zero:
            return
        for group in getattr(optimizer, "param_groups", ()):
            for p in group["params"]:
                if id(p) not in self.local_mask.param_ids:
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
        for p, entry in self.local_mask.entries.items():
            entry.mask_step_grad()
            if self.restore:
                target = entry.target()
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
        for p, entry in self.local_mask.entries.items():
            target = entry.target()
            torch.where(entry.masked(), self._backup[p], target, out=target)

    # ------------------------------------------------------------------ a mask that moves (fish_tuning.refresh)
    def check_movable(self) -> None:
        """Refuse a mask that moves where kept indices are per-shard or per-partition (FSDP2, ZeRO)."""
        if not self.local_mask.movable:
            raise NotImplementedError("a mask that moves is supported on one process and DDP; under FSDP2 or "
                                      "DeepSpeed ZeRO train with a fixed mask (no refresh)")

    def kept(self, p: Tensor) -> Tensor:
        """The kept flat indices of ``p`` (global ones wherever the mask may move)."""
        return self.local_mask.entries[p].index

    def set_kept(self, p: Tensor, idx: Tensor) -> None:
        """Train ``idx`` (sorted flat indices) of ``p`` from the next backward on (the caller sets ``self.mask``)."""
        self.local_mask.entries[p].set(idx)

    def set_tap(self, tap) -> None:
        """``tap(param, grad)`` sees every guarded gradient before its masked entries are zeroed (None: off)."""
        self._tap[0] = tap

    def state_bytes(self) -> int:
        """Bytes this guard keeps beside the model: kept indices, dense masks and step backups."""
        return self.local_mask.nbytes() + sum(t.numel() * t.element_size() for t in self._backup.values())

    def __repr__(self) -> str:
        owner = self._owner() if self._owner is not None else None
        by = f", owned by {type(owner).__name__} at {id(owner):#x}" if owner is not None else ""
        state = "attached" if self.attached else "detached"
        return f"MaskGuard(k={self.mask.num_selected:,}, {len(self.local_mask.entries)} tensors, {state}{by}, id {id(self):#x})"


def _grad_hook(entry: Layout, tap: list):
    """After each backward: ``tap[0]``, when set, sees the whole gradient, then the masked entries are zeroed."""

    def hook(p: Tensor) -> None:
        if p.grad is None:
            return
        if tap[0] is not None:
            tap[0](p, p.grad)
        entry.keep_grad()

    return hook
