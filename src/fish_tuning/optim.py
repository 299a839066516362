"""Masked training (Eq. 6): only the kept entries of each candidate tensor ever change."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .mask import FishMask


class MaskedOptimizer(torch.optim.Optimizer):
    """Wrap any torch optimizer so that masked entries stay bit-identical.

    Zeroing the gradient is not enough: AdamW's decoupled weight decay shrinks every entry, and momentum moves
    entries whose current gradient is zero. So two things happen:

    1. after each backward (``post_accumulate_grad`` hook) the gradient of masked entries is zeroed in place, so
       gradient clipping and accumulation see the masked gradient (Eq. 6), and optimizer moments stay 0 there;
    2. around ``step()`` the candidate tensors are copied to a persistent buffer and masked entries are written
       back afterwards, which undoes weight decay or any other rule of the wrapped optimizer.

    Parameters matching the mask's ``always_train`` train normally. Any other optimizer parameter that is not a
    mask candidate is an error. ``param_groups``, ``state``, ``state_dict`` and ``load_state_dict`` are those of
    the wrapped optimizer, so LR schedulers and the HF Trainer work unchanged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mask: FishMask, model: nn.Module):
        self.optimizer = optimizer
        self.mask = mask
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, attr, OrderedDict())
        self._guard = MaskGuard(mask, model, [p for g in optimizer.param_groups for p in g["params"]])
        self._frozen = self._guard.frozen

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
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group) -> None:
        raise NotImplementedError("MaskedOptimizer: add parameter groups to the wrapped optimizer before wrapping")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        self._guard.before_step()
        if closure is None:
            loss = self.optimizer.step()
        else:
            with torch.enable_grad():
                loss = self.optimizer.step(closure)
        self._guard.after_step()
        return loss

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (e.g. before training the model without the mask)."""
        self._guard.remove()

    def __repr__(self) -> str:
        return f"MaskedOptimizer(k={self.mask.num_selected:,}, {self.optimizer!r})"


class MaskGuard:
    """The mechanism of :class:`MaskedOptimizer` for an optimizer you do not own (e.g. the HF Trainer's).

    Construction registers the ``post_accumulate_grad`` hooks that zero masked gradients; :meth:`attach` adds step
    pre/post hooks to a torch optimizer that back up the candidate tensors and write masked entries back, so the
    optimizer object, its class and its state dict stay exactly as the caller built them.
    """

    def __init__(self, mask: FishMask, model: nn.Module, params: Iterable[Tensor]):
        mask.check(model)
        self.mask = mask
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.frozen: dict[Tensor, Tensor] = {}  # param -> bool, True where the entry must not change
        self._backup: dict[Tensor, Tensor] = {}
        self._handles: list = []
        for p in params:
            name = name_of.get(id(p))
            if name is None:
                raise ValueError("the optimizer holds a tensor that is not a parameter of the model given")
            if name in mask.shapes:
                if p not in self.frozen:
                    frozen = ~mask.bool_mask(name, device=p.device)
                    self.frozen[p] = frozen
                    self._handles.append(p.register_post_accumulate_grad_hook(_zero_masked_grad(frozen)))
            elif not mask.is_always_train(name):
                raise ValueError(
                    f"parameter '{name}' is in the optimizer but is neither a mask candidate nor always_train. "
                    "Add it to select_mask(..., always_train=...) or leave it out of the optimizer."
                )

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero masked gradients (also ones set by hand, not through backward) and back up candidate tensors."""
        for p, frozen in self.frozen.items():
            if p.grad is not None:
                p.grad.masked_fill_(frozen, 0)
            buf = self._backup.get(p)
            if buf is None:
                buf = self._backup[p] = torch.empty_like(p)
            buf.copy_(p)

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the backed-up value of every masked entry back (undoes weight decay, momentum, ...)."""
        for p, frozen in self.frozen.items():
            torch.where(frozen, self._backup[p], p, out=p)

    def attach(self, optimizer: torch.optim.Optimizer) -> MaskGuard:
        """Run :meth:`before_step` / :meth:`after_step` around every ``optimizer.step()`` (torch step hooks)."""
        self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.before_step()))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.after_step()))
        return self

    def remove(self) -> None:
        """Detach every hook this guard registered; the model then trains without the mask."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _zero_masked_grad(frozen: Tensor):
    def hook(p: Tensor) -> None:
        if p.grad is not None:
            p.grad.masked_fill_(frozen, 0)

    return hook


# --------------------------------------------------------------------------------------------- compact AdamW
_INDEX_DTYPE: dict[str, torch.dtype] = {}


def _index_dtype(device: torch.device) -> torch.dtype:
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


class SparseAdamW(torch.optim.Optimizer):
    """AdamW with moments only for the k kept entries: the lean path for masked training.

    ``MaskedOptimizer`` keeps dense moments plus a dense backup beside the mask (the paper's +7.6% memory). Here
    each candidate tensor holds its kept flat indices (int32 where the device allows) and compact ``exp_avg`` /
    ``exp_avg_sq`` of length k. A step gathers the kept gradient entries, applies torch.optim.AdamW's update
    (decoupled weight decay, bias correction) to them, and writes the k new values back: O(k) work and memory per
    tensor, and masked entries are never written, so they stay bit-identical. Always-trainable parameters
    (``mask.always_train``, e.g. a classifier head) get ordinary dense AdamW state.

    ``mask_grads`` zeroes the masked gradient entries after each backward (as ``MaskedOptimizer`` does) so that
    gradient clipping and logging see Eq. 6's masked gradient; the step itself never reads them.
    ``state_dict`` / ``load_state_dict`` and LR schedulers work as for any torch optimizer.
    """

    def __init__(self, model: nn.Module, mask: FishMask, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, mask_grads: bool = True):
        if not 0.0 <= lr or not 0.0 <= eps or not 0.0 <= weight_decay:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        mask.check(model)
        self.mask = mask
        self._index: dict[Tensor, Tensor] = {}
        params = []
        for name, p in model.named_parameters():
            if name in mask.shapes:
                if not p.requires_grad:
                    raise ValueError(f"mask candidate '{name}' does not require grad, so it can never train")
                if not p.is_contiguous():
                    raise ValueError(f"mask candidate '{name}' is not contiguous; SparseAdamW indexes its flat view")
                self._index[p] = mask.indices[name].to(device=p.device, dtype=_index_dtype(p.device))
                params.append(p)
            elif p.requires_grad:
                if not mask.is_always_train(name):
                    raise ValueError(
                        f"parameter '{name}' requires grad but is neither a mask candidate nor always_train. "
                        "Add it to select_mask(..., always_train=...) or set requires_grad=False."
                    )
                params.append(p)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._handles = []
        if mask_grads:
            for p, idx in self._index.items():
                self._handles.append(p.register_post_accumulate_grad_hook(_keep_only(idx)))

    def _compact_size(self, p: Tensor) -> int:
        idx = self._index.get(p)
        return p.numel() if idx is None else idx.numel()

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
                    shape = p.shape if p not in self._index else (self._compact_size(p),)
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                idx = self._index.get(p)
                steps.append(state["step"])
                if idx is None:
                    value, grad = p, p.grad
                elif idx.numel() == 0:
                    continue
                else:  # O(k): gather the kept entries, update them compactly, write them back below
                    value = p.view(-1).index_select(0, idx)
                    grad = p.grad.reshape(-1).index_select(0, idx)
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
                p.view(-1).index_put_((idx,), value)
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
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
        total = sum(idx.numel() * idx.element_size() for idx in self._index.values())
        for state in self.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))
        return total

    def remove_hooks(self) -> None:
        """Detach the gradient-masking hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return f"SparseAdamW(k={self.mask.num_selected:,}, defaults={self.defaults})"


def _keep_only(idx: Tensor):
    """Zero every gradient entry except the kept ones without a dense mask: gather k, zero, scatter k back."""

    def hook(p: Tensor) -> None:
        if p.grad is None:
            return
        if not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        flat = p.grad.view(-1)
        kept = flat.index_select(0, idx)
        flat.zero_()
        flat.index_put_((idx,), kept)

    return hook


def make_optimizer(model: nn.Module, mask: FishMask, lr: float = 1e-3, weight_decay: float = 1e-2,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   sparse: bool = True) -> torch.optim.Optimizer:
    """The default optimizer for masked training: ``SparseAdamW`` (compact state).

    ``sparse=False`` gives the generic path, ``MaskedOptimizer(torch.optim.AdamW(...))``, with the same updates
    but dense moments and a dense backup.
    """
    if sparse:
        return SparseAdamW(model, mask, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return MaskedOptimizer(inner, mask, model)
