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
