"""Masked training (Eq. 6): only the kept entries of each candidate tensor ever change."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .guard import MaskGuard
from .layout import LocalMask
from .mask import FishMask
from .refresh import MaskRefresher, RefreshSchedule
from .sharded import local


class MaskedOptimizer(torch.optim.Optimizer):
    """Wrap any torch optimizer so that masked entries stay bit-identical.

    Zeroing the gradient is not enough: AdamW's decoupled weight decay shrinks every entry, and momentum moves
    entries whose current gradient is zero. A :class:`~fish_tuning.MaskGuard` owned by this wrapper therefore

    1. zeroes the gradient of masked entries after each backward (``post_accumulate_grad`` hook), so gradient
       clipping and accumulation see the masked gradient (Eq. 6), and optimizer moments stay 0 there;
    2. backs up the candidate tensors around every step of the wrapped optimizer (its step hooks, so a direct
       ``wrapped.step()`` is covered too) and writes masked entries back afterwards, which undoes weight decay or
       any other rule of the wrapped optimizer, also when that step raises part-way.

    The hooks live as long as this wrapper: :meth:`close` removes them, and so does garbage collection of the
    wrapper. Parameters matching the mask's ``always_train`` train normally; any other optimizer parameter that
    is not a mask candidate is an error. ``param_groups`` and ``state`` are those of the wrapped optimizer, so
    LR schedulers and the HF Trainer work unchanged; step / state-dict hooks registered on the wrapper fire as
    on any torch optimizer. ``state_dict()`` records the mask's fingerprint, and ``load_state_dict`` refuses a
    state saved with another mask or by another optimizer class.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mask: FishMask, model: nn.Module,
                 refresh: RefreshSchedule | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MaskedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.mask = mask
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, attr, OrderedDict())
        self._patch_step_function()  # what Optimizer.__init__ does so that registered step hooks fire
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self._guard = MaskGuard(mask, model, params).attach(self, step_hooks=False)
        # torch runs step hooks only where Optimizer.__init__ patched the class's step ("hooked"); else step() calls
        # the guard by hand, and then only through this wrapper
        self._hooked = bool(getattr(type(optimizer).step, "hooked", False))
        if self._hooked:
            self._guard.hook_steps(optimizer)
        # a mask that moves (fish_tuning.refresh); self.mask stays the mask it was built with, .refresher.mask moves
        self.refresher = MaskRefresher(self._guard, self, refresh) if refresh is not None else None

    # Delegation: the wrapped optimizer owns all state.
    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def state_dict(self):
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {**self.optimizer.state_dict(),
                 FISH_STATE_KEY: fish_state("MaskedOptimizer", self.mask, inner=type(self.optimizer).__name__)}
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, state)
            state = out if out is not None else state
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = check_fish_state(state_dict, "MaskedOptimizer", self.mask, inner=type(self.optimizer).__name__)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            state_dict = out if out is not None else state_dict
        self.optimizer.load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group) -> None:
        raise NotImplementedError("MaskedOptimizer: add parameter groups to the wrapped optimizer before wrapping")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        if not self._guard.attached:
            raise RuntimeError("MaskedOptimizer was closed: its mask no longer applies; build a new one to train")
        if not self._hooked:
            self._guard.before_step(self.optimizer)
        try:
            if closure is None:
                loss = self.optimizer.step()
            else:
                with torch.enable_grad():
                    loss = self.optimizer.step(closure)
        finally:  # also when the wrapped step raises part-way: what it moved of the masked entries goes back
            self._guard.after_step()
        return loss

    def state_bytes(self) -> int:
        """Bytes kept beside the model: the wrapped optimizer's state plus the guard's indices, masks and backups."""
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                    if isinstance(t, Tensor))
        return state + self._guard.state_bytes()

    def close(self) -> None:
        """Remove the masking hooks (also done when this optimizer is garbage-collected)."""
        self._guard.close()

    def __repr__(self) -> str:
        return f"MaskedOptimizer(k={self.mask.num_selected:,}, {self.optimizer!r})"


FISH_STATE_KEY = "fish_tuning"


def fish_state(optimizer: str, mask: FishMask, **extra: str) -> dict:
    """What an optimizer's state_dict records about the mask it was built for."""
    return {"optimizer": optimizer, "mask": mask.fingerprint(), **extra}


def check_fish_state(state_dict: dict, optimizer: str, mask: FishMask, **extra: str) -> dict:
    """Refuse a state saved by another optimizer class or with another mask; returns the state without the fish record."""
    info = state_dict.get(FISH_STATE_KEY) if isinstance(state_dict, dict) else None
    if not isinstance(info, dict):
        raise ValueError(f"this optimizer state was not saved by a {optimizer} (it has no '{FISH_STATE_KEY}' record, "
                         "e.g. a plain torch optimizer's state): load it into the optimizer class that saved it")
    wanted = fish_state(optimizer, mask, **extra)
    for key in ("optimizer", *extra):
        if info.get(key) != wanted[key]:
            raise ValueError(f"this optimizer state was saved by {info.get('optimizer')}"
                             f"({info.get('inner', '')}), not {optimizer}({extra.get('inner', '')}): load it into "
                             "the same optimizer class")
    if info.get("mask") != wanted["mask"]:
        raise ValueError(f"this optimizer state was saved with another mask (fingerprint {info.get('mask')}; this "
                         f"optimizer's mask is {wanted['mask']}): resume with the mask of the run that saved it "
                         "(FishMask.load of its fish_mask.safetensors)")
    return {k: v for k, v in state_dict.items() if k != FISH_STATE_KEY}


# --------------------------------------------------------------------------------------------- compact AdamW
class SparseAdamW(torch.optim.Optimizer):
    """AdamW with moments only for the k kept entries: the lean path for masked training.

    ``MaskedOptimizer`` keeps dense moments plus a dense backup beside the mask (the paper's +7.6% memory). Here
    each candidate tensor holds its kept flat indices (int32 where the device allows) and compact ``exp_avg`` /
    ``exp_avg_sq`` of length k. A step gathers the kept gradient entries, applies torch.optim.AdamW's update
    (decoupled weight decay, bias correction) to them, and writes the k new values back: O(k) work and memory per
    tensor, and masked entries are never written, so they stay bit-identical. Always-trainable parameters
    (``mask.always_train``, e.g. a classifier head) get ordinary dense AdamW state; excluded candidates
    (``mask.excluded``) get none and never change.

    ``mask_grads`` zeroes the masked gradient entries after each backward (through a
    :class:`~fish_tuning.MaskGuard` this optimizer owns) so that gradient clipping and logging see Eq. 6's masked
    gradient; the step itself never reads them. :meth:`close` (or garbage collection) removes that hook.
    ``state_dict`` records the mask's fingerprint; ``load_state_dict`` refuses a state of another mask or optimizer.

    Under FSDP2 each rank keeps moments only for the kept entries of its own shards (see :mod:`fish_tuning.sharded`);
    its ``state_dict`` is therefore per rank: save one file per rank and resume with the same world size.

    Parameter groups as in every torch optimizer: ``SparseAdamW(groups, mask, model=model)`` with e.g. decay and
    no-decay groups or per-group ``lr``; ``SparseAdamW(model, mask)`` puts every trainable parameter in one group.
    """

    def __init__(self, params: nn.Module | Iterable, mask: FishMask, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 mask_grads: bool = True, model: nn.Module | None = None, refresh: RefreshSchedule | None = None):
        lr = _scalar_lr(lr)
        _check_hyper({"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        if isinstance(params, nn.Module):  # SparseAdamW(model, mask): every trainable parameter, one group
            model, groups = params, None
        elif model is None:
            raise TypeError("SparseAdamW(params, mask, model=model): the model is needed to map parameters to the "
                            "mask's names (or pass the model itself as the first argument)")
        else:  # torch convention: an iterable of tensors or of param-group dicts
            groups = list(params)
            if not groups:
                raise ValueError("SparseAdamW got an empty parameter list")
            if not isinstance(groups[0], dict):
                groups = [{"params": groups}]
            groups = [{**g, "params": list(g["params"])} for g in groups]
            for g in groups:
                if "lr" in g:
                    g["lr"] = _scalar_lr(g["lr"])
                _check_hyper(g)
        self.mask = mask
        name_of = {id(p): n for n, p in model.named_parameters()}
        chosen = (p for _, p in model.named_parameters()) if groups is None else (
            p for g in groups for p in g["params"])
        masked, dense = [], []
        excluded = set(mask.excluded)
        for p in chosen:
            name = name_of.get(id(p))
            if name is None:
                raise ValueError("SparseAdamW got a tensor that is not a parameter of the model")
            if name in mask.shapes or name in excluded:
                if name in mask.shapes and not p.requires_grad:
                    raise ValueError(f"mask candidate '{name}' does not require grad, so it can never train")
                if not p.requires_grad:
                    continue
                if not p.is_contiguous():
                    raise ValueError(f"mask candidate '{name}' is not contiguous; SparseAdamW indexes its flat view")
                masked.append(p)
            elif p.requires_grad or groups is not None:
                if not mask.is_always_train(name):
                    raise ValueError(
                        f"parameter '{name}' is trainable but is neither a mask candidate nor always_train. "
                        "Add it to select_mask(..., always_train=...) or set requires_grad=False."
                    )
                dense.append(p)
        # the kept indices, laid out per tensor (FSDP2: this rank's shard); one copy, read by the step and by the
        # guard's hooks, so a moving mask reaches both
        self.local_mask = LocalMask(mask, model, masked)
        if groups is None:
            groups = [{"params": masked + dense}]
        else:
            keep = {id(p) for p in masked + dense}
            groups = [{**g, "params": [p for p in g["params"] if id(p) in keep]} for g in groups]
        self._dense_ids = frozenset(id(p) for p in dense)
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._built = True
        self._guard: MaskGuard | None = None
        if mask_grads or refresh is not None:  # a refresh sees the gradients through the guard's hooks
            self._guard = MaskGuard.over(self.local_mask, restore=False).attach(self, step_hooks=False)
        self.refresher = MaskRefresher(self._guard, self, refresh) if refresh is not None else None

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):  # torch.optim.Optimizer.__init__ adds the constructor's groups here
            raise NotImplementedError("SparseAdamW: a group added later would have no mask entry and train densely; "
                                      "pass every parameter group to the constructor")
        super().add_param_group(param_group)

    def _kept(self, p: Tensor) -> Tensor | None:
        """The kept flat positions of ``p``'s local tensor, or None for a dense (always-trainable) tensor."""
        entry = self.local_mask.entries.get(p)
        return None if entry is None else entry.index

    def _compact_size(self, p: Tensor) -> int:
        idx = self._kept(p)
        return local(p).numel() if idx is None else idx.numel()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            values, grads, avgs, sqs, steps, scatter = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SparseAdamW does not take sparse gradients")
                state = self.state[p]
                if not state:
                    # state of this rank's shard only under FSDP2 (local tensors), compact for masked tensors
                    shape = local(p).shape if p not in self.local_mask.entries else (self._compact_size(p),)
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                idx = self._kept(p)
                if idx is None and id(p) not in self._dense_ids:
                    raise RuntimeError(f"SparseAdamW: a tensor of shape {tuple(p.shape)} was put in param_groups "
                                       "after construction; it has no mask entry and would train densely. Pass "
                                       "every parameter group to the constructor")
                steps.append(state["step"])
                if idx is None:
                    value, grad = local(p), local(p.grad)
                elif idx.numel() == 0:
                    continue
                else:  # O(k): gather the kept entries, update them compactly, write them back below
                    value = local(p).view(-1).index_select(0, idx)
                    grad = local(p.grad).reshape(-1).index_select(0, idx)
                    scatter.append((p, idx, value))
                values.append(value)
                grads.append(grad)
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
            if steps:
                torch._foreach_add_(steps, 1.0)
            if not values:
                continue
            # Bias corrections: one scalar when all tensors are at the same step (the usual case), else a list.
            counts = {float(t) for t in steps}
            if len(counts) == 1:
                step = counts.pop()
                neg_step, bc2_sqrt = -lr / (1 - beta1**step), (1 - beta2**step) ** 0.5
            else:
                live = [float(self.state[p]["step"]) for p in group["params"] if p.grad is not None
                        and self._compact_size(p) > 0]
                neg_step = [-lr / (1 - beta1**t) for t in live]
                bc2_sqrt = [(1 - beta2**t) ** 0.5 for t in live]
            # The same operations, in the same order, as torch.optim.AdamW's single-tensor update.
            if wd != 0:
                torch._foreach_mul_(values, 1 - lr * wd)
            torch._foreach_lerp_(avgs, grads, 1 - beta1)
            torch._foreach_mul_(sqs, beta2)
            torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(sqs)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(values, avgs, denom, neg_step)
            for p, idx, value in scatter:
                local(p).view(-1).index_put_((idx,), value)
        return loss

    def state_dict(self):
        state = super().state_dict()
        state[FISH_STATE_KEY] = fish_state("SparseAdamW", self.mask)
        return state

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(check_fish_state(state_dict, "SparseAdamW", self.mask))
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                for key in ("exp_avg", "exp_avg_sq"):
                    if state and state[key].numel() != self._compact_size(p):
                        raise ValueError(
                            f"optimizer state does not fit this mask: '{key}' has {state[key].numel()} entries for "
                            f"a tensor with {self._compact_size(p)} kept entries (was it saved with another mask?)"
                        )

    def state_bytes(self) -> int:
        """Bytes of optimizer state plus kept indices (what the mask costs beside the model)."""
        total = sum(e.index.numel() * e.index.element_size() for e in self.local_mask.entries.values())
        for state in self.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))
        return total

    def close(self) -> None:
        """Remove the gradient-masking hooks (also done when this optimizer is garbage-collected)."""
        if self._guard is not None:
            self._guard.close()

    def __repr__(self) -> str:
        return f"SparseAdamW(k={self.mask.num_selected:,}, defaults={self.defaults})"


# torch.optim.AdamW options SparseAdamW does not implement, with the only value it supports
_UNSUPPORTED = {"maximize": False, "amsgrad": False, "capturable": False, "differentiable": False,
                "decoupled_weight_decay": True}


def _scalar_lr(lr):
    """A one-element tensor learning rate read once as a float (as torch's AdamW does); anything else as given."""
    return float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr


def _check_hyper(group: dict) -> None:
    """Refuse hyper-parameters out of range or AdamW options this optimizer would silently ignore."""
    for key, supported in _UNSUPPORTED.items():
        if key in group and bool(group[key]) != supported:
            raise ValueError(f"SparseAdamW does not implement {key}={group[key]!r}: use "
                             f"MaskedOptimizer(torch.optim.AdamW(..., {key}={group[key]!r}), mask, model)")
    lr, eps, wd = group.get("lr", 0.0), group.get("eps", 0.0), group.get("weight_decay", 0.0)
    if not (0.0 <= lr and 0.0 <= eps and 0.0 <= wd):
        raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {wd}")
    betas = group.get("betas", (0.0, 0.0))
    if not (len(betas) == 2 and 0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")


def make_optimizer(model: nn.Module, mask: FishMask, lr: float = 1e-3, weight_decay: float = 1e-2,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   sparse: bool = True, refresh: RefreshSchedule | None = None) -> torch.optim.Optimizer:
    """The default optimizer for masked training: ``SparseAdamW`` (compact state).

    ``sparse=False`` gives the generic path, ``MaskedOptimizer(torch.optim.AdamW(...))``, with the same updates
    but dense moments and a dense backup. ``refresh``: a mask that moves during training (:mod:`fish_tuning.refresh`).
    """
    if sparse:
        return SparseAdamW(model, mask, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, refresh=refresh)
    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return MaskedOptimizer(inner, mask, model, refresh=refresh)
