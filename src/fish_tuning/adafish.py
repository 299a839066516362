"""AdaFish: AdamW with an r x r Fisher preconditioner for each LoRA factor (arXiv 2403.13128; rule in docs/adafish.md).

For a factor with rank dimension r (peft: ``lora_A.weight`` is [r, in], ``lora_B.weight`` is [out, r]) write its
gradient in rank-major form G in R^{r x n}. AdaFish keeps, per factor,

    M <- b1 M + (1 - b1) G                        (first moment, as AdamW)
    F <- b2 F + (1 - b2) G G^T / n                (r x r generalized Fisher, one Kronecker side)
    P  = (F / (1 - b2^t) + delta I)^(-exponent),  delta = damping * tr(F / (1 - b2^t)) / r
    W <- W (1 - lr wd) - lr P M / (1 - b1^t)      (for B: W <- ... - lr M P, the same thing in [out, r] layout)

so preconditioning costs one r x r eigendecomposition per factor and step. Every other parameter (heads, biases,
DoRA magnitudes) gets exactly AdamW's update.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

RANK_DIM = {"A": 0, "B": 1}  # where r sits in peft's weights: A [r, in(, k, k)], B [out, r(, 1, 1)]


def lora_factors(model: nn.Module) -> dict[str, str]:
    """``{parameter name: "A" | "B"}`` for every trainable LoRA factor, read from peft's ``LoraLayer`` modules.

    Linear / Conv ``lora_A`` / ``lora_B`` weights and the ``lora_embedding_A`` / ``lora_embedding_B`` parameters
    count; their biases (``lora_bias=True``) and DoRA's magnitude vector are not factors.
    """
    from peft.tuners.lora import LoraLayer

    kind: dict[int, str] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for letter in ("A", "B"):
            for adapter, sub in getattr(module, f"lora_{letter}", {}).items():
                kind[id(sub.weight)] = letter
                other = getattr(module, "lora_B" if letter == "A" else "lora_A", {})
                if adapter not in other:
                    raise ValueError(f"LoRA adapter '{adapter}' has lora_{letter} but no partner factor")
            for param in getattr(module, f"lora_embedding_{letter}", {}).values():
                kind[id(param)] = letter
    return {n: kind[id(p)] for n, p in model.named_parameters() if id(p) in kind and p.requires_grad}


class AdaFish(torch.optim.Optimizer):
    """Second-order optimizer for low-rank adapters: an EMA of an r x r Fisher matrix per LoRA factor.

    Args:
        model_or_params: a peft model (factors found through :func:`lora_factors`, every other trainable
            parameter falls back to AdamW), or parameters / param groups. In groups, ``"factor": "A"`` marks
            tensors whose dim 0 is the rank, ``"factor": "B"`` those whose dim 1 is; unmarked groups use AdamW.
        lr: learning rate.
        betas: EMA rates of the first moment and of the second moment / Fisher matrix.
        damping: relative Tikhonov damping, a fraction of the mean eigenvalue of the bias-corrected Fisher
            matrix (scale-free; it caps how much weak directions are amplified).
        weight_decay: decoupled weight decay (as AdamW).
        exponent: the preconditioner is ``(F + delta I)^-exponent``; 0.5 is Adam-like (learning rates transfer
            from AdamW), 1.0 is a damped natural-gradient / Gauss-Newton step.
        eps: AdamW's epsilon for the non-factor parameters.

    Compose with a FISH mask as ``MaskedOptimizer(AdaFish(model, ...), mask, model)``: the mask's gradient hook
    keeps masked gradients out of M and F, and its restore undoes the parts of P M that the r x r mixing moves
    onto masked entries.
    """

    def __init__(self, model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), damping: float = 1e-3, weight_decay: float = 0.0,
                 exponent: float = 0.5, eps: float = 1e-8):
        _check_hparams(lr, betas, damping, weight_decay, exponent, eps)
        if isinstance(model_or_params, nn.Module):
            params: Any = _groups_from_model(model_or_params)
        else:
            params = list(model_or_params)
        defaults = dict(lr=lr, betas=tuple(betas), damping=damping, weight_decay=weight_decay, exponent=exponent,
                        eps=eps, factor=None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hparams(group["lr"], group["betas"], group["damping"], group["weight_decay"], group["exponent"],
                       group["eps"])
        factor = group["factor"]
        if factor is not None:
            if factor not in RANK_DIM:
                raise ValueError(f"param group 'factor' must be 'A', 'B' or None, got {factor!r}")
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"a LoRA factor '{factor}' must have at least 2 dims, got shape "
                                     f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaFish does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group["factor"])
                state["step"] += 1
                t = state["step"]
                if wd != 0:
                    p.mul_(1 - lr * wd)
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                if group["factor"] is None:
                    _adamw_update(p, state, lr, b1, b2, group["eps"], t)
                else:
                    _fisher_update(p, state, lr, b1, b2, group["damping"], group["exponent"], t,
                                   RANK_DIM[group["factor"]])
        return loss

    @staticmethod
    def _init_state(p: Tensor, state: dict, factor: str | None) -> None:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if factor is None:
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            r = p.shape[RANK_DIM[factor]]
            state["fisher"] = torch.zeros(r, r, dtype=torch.float32, device=p.device)


def make_adafish(model: nn.Module, mask=None, **kwargs: Any) -> torch.optim.Optimizer:
    """Factory for the CLI / Trainer: ``AdaFish(model, **kwargs)``, wrapped in ``MaskedOptimizer`` if ``mask``."""
    opt = AdaFish(model, **kwargs)
    if mask is None:
        return opt
    from .optim import MaskedOptimizer

    return MaskedOptimizer(opt, mask, model)


# -- internals -----------------------------------------------------------------------------------------------


def _check_hparams(lr, betas, damping, weight_decay, exponent, eps) -> None:
    if not lr >= 0:
        raise ValueError(f"AdaFish: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"AdaFish: betas must be two numbers in [0, 1), got {betas}")
    if not damping > 0:
        raise ValueError(f"AdaFish: damping must be > 0 (it keeps the r x r Fisher invertible), got {damping}")
    if not weight_decay >= 0:
        raise ValueError(f"AdaFish: weight_decay must be >= 0, got {weight_decay}")
    if not 0 < exponent <= 1:
        raise ValueError(f"AdaFish: exponent must be in (0, 1], got {exponent}")
    if not eps > 0:
        raise ValueError(f"AdaFish: eps must be > 0, got {eps}")


def _groups_from_model(model: nn.Module) -> list[dict[str, Any]]:
    kinds = lora_factors(model)
    groups: dict[str | None, list[Tensor]] = {"A": [], "B": [], None: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[kinds.get(name)].append(p)
    if not kinds:
        warnings.warn("AdaFish found no trainable LoRA factors in the model: every parameter uses AdamW",
                      stacklevel=3)
    out = [{"params": ps, "factor": f} for f, ps in groups.items() if ps]
    if not out:
        raise ValueError("AdaFish: the model has no trainable parameters")
    return out


def _adamw_update(p: Tensor, state: dict, lr: float, b1: float, b2: float, eps: float, t: int) -> None:
    """torch.optim.AdamW's single-tensor rule (weight decay already applied)."""
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg_sq.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
    denom = (exp_avg_sq.sqrt() / (1 - b2**t) ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - b1**t))


def _rank_major(x: Tensor, dim: int) -> Tensor:
    return x.movedim(dim, 0).reshape(x.shape[dim], -1)


def _fisher_update(p: Tensor, state: dict, lr: float, b1: float, b2: float, damping: float, exponent: float,
                   t: int, dim: int) -> None:
    g = _rank_major(p.grad, dim).float()
    fisher = state["fisher"]
    fisher.mul_(b2).add_(g @ g.T, alpha=(1 - b2) / g.shape[1])
    precond = inverse_power(fisher / (1 - b2**t), damping, exponent)
    update = precond @ _rank_major(state["exp_avg"], dim).float()
    moved = p.movedim(dim, 0).shape
    p.add_(update.reshape(moved).movedim(0, dim).to(p.dtype), alpha=-lr / (1 - b1**t))


def inverse_power(fisher: Tensor, damping: float, exponent: float) -> Tensor:
    """``(F + delta I)^-exponent`` with ``delta = damping * tr(F) / r``, via a float64 eigendecomposition.

    A zero F (no gradient seen yet, or a factor that a mask freezes entirely) gives a zero preconditioner: there
    is no curvature information, and the first moment is zero there too.
    """
    f = fisher.double()
    f = (f + f.T) / 2
    r = f.shape[0]
    delta = damping * torch.trace(f) / r
    if not bool(delta > 0):
        return torch.zeros_like(fisher)
    evals, evecs = torch.linalg.eigh(f)
    scale = (evals.clamp_min(0) + delta).pow(-exponent)
    return ((evecs * scale) @ evecs.T).to(fisher.dtype)
