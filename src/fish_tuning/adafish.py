"""AdaFish: an r x r generalized-Fisher preconditioner for each LoRA factor (arXiv 2403.13128; docs/adafish.md).

For a factor with rank dimension r (peft: ``lora_A.weight`` is [r, in], ``lora_B.weight`` is [out, r]) write its
gradient in rank-major form G in R^{r x n}. The default ("fisher") step, per factor and step t:

    d  <- b2 d + (1 - b2) mean_r(G^2),  w = 1 / (sqrt(d / (1 - b2^t)) + eps)   (n side, Adafactor-style; variant)
    M  <- b1 M + (1 - b1) G
    F  <- b2 F + (1 - b2) (G w)(G w)^T / n                                      (r x r generalized Fisher)
    F^ = F / (1 - b2^t) / (tr F^ / r)                                            (trace-normalised)
    W  <- W (1 - lr wd) - lr (F^ + 0.1 I)^-1 (M w) / (1 - b1^t)                 (exponent 1: the paper's inverse)

Other variants (``VARIANTS``) change the exponent, drop the n-side treatment, or graft the step to AdamW's norm.
Every parameter that is not a LoRA factor (heads, biases, DoRA magnitudes) gets exactly AdamW's update.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

RANK_DIM = {"A": 0, "B": 1}  # where r sits in peft's weights: A [r, in(, k, k)], B [out, r(, 1, 1)]
SCALES = ("trace", "graft", "none")
N_SIDES = ("diag", "graft", "none")
FISHERS = ("batch", "per_sample")
# Named rules (docs/adafish.md; damping as measured in BENCHMARKS.md). "fisher" is the default; "paper" is the
# literal step; "sqrt" is the exponent-0.5 rule (inverse square root, as Adam's second moment).
VARIANTS: dict[str, dict[str, Any]] = {
    "fisher": dict(exponent=1.0, scale="trace", n_side="diag", damping=0.1),
    "fisher_graft": dict(exponent=1.0, scale="graft", n_side="none", damping=1e-3),
    "fisher_colgraft": dict(exponent=1.0, scale="graft", n_side="graft", damping=1e-3),
    "paper": dict(exponent=1.0, scale="none", n_side="none", damping=1e-3),
    "sqrt": dict(exponent=0.5, scale="none", n_side="none", damping=1e-3),
    "sqrt_diag": dict(exponent=0.5, scale="trace", n_side="diag", damping=1e-3),
}


def lora_factors(model: nn.Module) -> dict[str, str]:
    """``{parameter name: "A" | "B"}`` for every trainable LoRA factor, read from peft's ``LoraLayer`` modules.

    Linear / Conv ``lora_A`` / ``lora_B`` weights and the ``lora_embedding_A`` / ``lora_embedding_B`` parameters
    count; their biases (``lora_bias=True``) and DoRA's magnitude vector are not factors.
    """
    from peft.tuners.lora import LoraLayer

    factor: dict[int, str] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for letter in ("A", "B"):
            for adapter, sub in getattr(module, f"lora_{letter}", {}).items():
                factor[id(sub.weight)] = letter
                other = getattr(module, "lora_B" if letter == "A" else "lora_A", {})
                if adapter not in other:
                    raise ValueError(f"LoRA adapter '{adapter}' has lora_{letter} but no partner factor")
            for param in getattr(module, f"lora_embedding_{letter}", {}).values():
                factor[id(param)] = letter
    return {n: factor[id(p)] for n, p in model.named_parameters() if id(p) in factor and p.requires_grad}


class AdaFish(torch.optim.Optimizer):
    """Second-order optimizer for low-rank adapters: an EMA of an r x r Fisher matrix per LoRA factor, inverted.

    Args:
        model_or_params: a peft model (factors found through :func:`lora_factors`, every other trainable
            parameter falls back to AdamW), or parameters / param groups. In groups, ``"factor": "A"`` marks
            tensors whose dim 0 is the rank, ``"factor": "B"`` those whose dim 1 is; unmarked groups use AdamW.
        lr: learning rate (for the default variant on the same scale as AdamW's: the step is dimensionless).
        betas: EMA rates of the first moment and of the second moments / Fisher matrix.
        damping: Tikhonov damping relative to the mean eigenvalue of the bias-corrected Fisher matrix; it caps how
            much a weak rank direction is amplified (by ``1 / damping`` at exponent 1). None: the variant's.
        weight_decay: decoupled weight decay (as AdamW).
        variant: a name in ``VARIANTS`` giving ``exponent``, ``scale``, ``n_side`` and ``damping``; explicit
            arguments win.
        exponent: the preconditioner is ``(F + delta I)^-exponent``: 1 is the paper's inverse, 0.5 Adam-like.
        scale: how the step gets a learning rate that transfers: ``"trace"`` divides F by its mean eigenvalue,
            ``"graft"`` rescales the step to AdamW's per-tensor step norm, ``"none"`` is the raw preconditioner.
        n_side: the non-rank dimension: ``"diag"`` an Adafactor-style diagonal second moment per column,
            ``"graft"`` each column rescaled to AdamW's column norm, ``"none"`` untreated (the paper).
        fisher: ``"batch"`` builds F from the mini-batch gradient, ``"per_sample"`` from per-sample gradients
            (hooks on the LoRA Linear layers; needs a model, and ``scale`` other than ``"none"``).
        eps: AdamW's epsilon, for non-factor parameters and the AdamW / n-side denominators.

    Compose with a FISH mask as ``MaskedOptimizer(AdaFish(model, ...), mask, model)`` (or :func:`make_adafish`):
    the mask's gradient hook keeps masked gradients out of every statistic, and its restore undoes the parts of the
    step that the r x r mixing moves onto masked entries.
    """

    def __init__(self, model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), damping: float | None = None, weight_decay: float = 0.0,
                 variant: str = "fisher", exponent: float | None = None, scale: str | None = None,
                 n_side: str | None = None, fisher: str = "batch", eps: float = 1e-8):
        if variant not in VARIANTS:
            raise ValueError(f"AdaFish: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        given = dict(exponent=exponent, scale=scale, n_side=n_side, damping=damping)
        rule = {**VARIANTS[variant], **{k: v for k, v in given.items() if v is not None}}
        if fisher not in FISHERS:
            raise ValueError(f"AdaFish: fisher must be one of {FISHERS}, got {fisher!r}")
        if fisher == "per_sample" and not isinstance(model_or_params, nn.Module):
            raise ValueError("AdaFish: fisher='per_sample' needs the model (its LoRA layers are hooked)")
        if isinstance(model_or_params, nn.Module):
            params: Any = _groups_from_model(model_or_params)
        else:
            params = list(model_or_params)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, factor=None, fisher=fisher,
                        **rule)
        super().__init__(params, defaults)
        self._per_sample = _PerSampleGrads(model_or_params, self) if fisher == "per_sample" else None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        factor = group["factor"]
        if factor is not None:
            if factor not in RANK_DIM:
                raise ValueError(f"param group 'factor' must be 'A', 'B' or None, got {factor!r}")
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"a LoRA factor '{factor}' must have at least 2 dims, got shape "
                                     f"{tuple(p.shape)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A state whose groups lack the rule keys (scale, n_side, fisher) loads with the plain rule for them."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, old in (("scale", "none"), ("n_side", "none"), ("fisher", "batch")):
                group.setdefault(key, old)

    def set_entry_masks(self, masks: dict[Tensor, Tensor]) -> None:
        """Bool masks (True = trainable) applied to per-sample gradients; :func:`make_adafish` sets them."""
        if self._per_sample is not None:
            self._per_sample.masks = dict(masks)

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
                    self._init_state(p, state, group)
                state["step"] += 1
                if wd != 0:
                    p.mul_(1 - lr * wd)
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                if "exp_avg_sq" in state:
                    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                if group["factor"] is None:
                    p.add_(_adam_direction(state, b1, b2, group["eps"]), alpha=-lr)
                else:
                    samples = self._per_sample.pop(p) if self._per_sample is not None else None
                    p.add_(_fisher_direction(p, state, group, samples).to(p.dtype), alpha=-lr)
        if self._per_sample is not None:
            self._per_sample.clear()
        return loss

    @staticmethod
    def _init_state(p: Tensor, state: dict, group: dict) -> None:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        factor = group["factor"]
        if factor is None or "graft" in (group["scale"], group["n_side"]):
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if factor is not None:
            r = p.shape[RANK_DIM[factor]]
            state["fisher"] = torch.zeros(r, r, dtype=torch.float32, device=p.device)
            if group["n_side"] == "diag":
                state["col_sq"] = torch.zeros(p.numel() // r, dtype=torch.float32, device=p.device)


def make_adafish(model: nn.Module, mask=None, **kwargs: Any) -> torch.optim.Optimizer:
    """Factory for the CLI / Trainer: ``AdaFish(model, **kwargs)``, wrapped in ``MaskedOptimizer`` if ``mask``."""
    opt = AdaFish(model, **kwargs)
    if mask is None:
        return opt
    from .optim import MaskedOptimizer

    named = dict(model.named_parameters())
    opt.set_entry_masks({named[n]: mask.bool_mask(n, device=named[n].device) for n in mask.names if n in named})
    return MaskedOptimizer(opt, mask, model)


# -- internals -----------------------------------------------------------------------------------------------


def _check_group(g: dict) -> None:
    if not g["lr"] >= 0:
        raise ValueError(f"AdaFish: lr must be >= 0, got {g['lr']}")
    if len(g["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in g["betas"]):
        raise ValueError(f"AdaFish: betas must be two numbers in [0, 1), got {g['betas']}")
    if not g["damping"] > 0:
        raise ValueError(f"AdaFish: damping must be > 0 (it keeps the r x r Fisher invertible), got {g['damping']}")
    if not g["weight_decay"] >= 0:
        raise ValueError(f"AdaFish: weight_decay must be >= 0, got {g['weight_decay']}")
    if not 0 < g["exponent"] <= 1:
        raise ValueError(f"AdaFish: exponent must be in (0, 1], got {g['exponent']}")
    if not g["eps"] > 0:
        raise ValueError(f"AdaFish: eps must be > 0, got {g['eps']}")
    for key, allowed in (("scale", SCALES), ("n_side", N_SIDES), ("fisher", FISHERS)):
        if g[key] not in allowed:
            raise ValueError(f"AdaFish: {key} must be one of {allowed}, got {g[key]!r}")
    if g["fisher"] == "per_sample" and g["scale"] == "none":
        raise ValueError("AdaFish: fisher='per_sample' needs scale 'trace' or 'graft' (its scale depends on the "
                         "loss reduction)")


def _groups_from_model(model: nn.Module) -> list[dict[str, Any]]:
    factors = lora_factors(model)
    groups: dict[str | None, list[Tensor]] = {"A": [], "B": [], None: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[factors.get(name)].append(p)
    if not factors:
        warnings.warn("AdaFish found no trainable LoRA factors in the model: every parameter uses AdamW",
                      stacklevel=3)
    out = [{"params": ps, "factor": f} for f, ps in groups.items() if ps]
    if not out:
        raise ValueError("AdaFish: the model has no trainable parameters")
    return out


def _adam_direction(state: dict, b1: float, b2: float, eps: float) -> Tensor:
    """torch.optim.AdamW's single-tensor step per unit learning rate (weight decay applied separately)."""
    t = state["step"]
    denom = (state["exp_avg_sq"].sqrt() / (1 - b2**t) ** 0.5).add_(eps)
    return state["exp_avg"] / denom / (1 - b1**t)


def _rank_major(x: Tensor, dim: int) -> Tensor:
    return x.movedim(dim, 0).reshape(x.shape[dim], -1)


def _fisher_direction(p: Tensor, state: dict, group: dict, samples: Tensor | None) -> Tensor:
    """The factor's step per unit learning rate, in the factor's own layout (docs/adafish.md, "Update rule")."""
    (b1, b2), t, eps = group["betas"], state["step"], group["eps"]
    dim = RANK_DIM[group["factor"]]
    g = _rank_major(p.grad, dim).float()
    m = _rank_major(state["exp_avg"], dim).float() / (1 - b1**t)
    n = g.shape[1]
    if group["n_side"] == "diag":  # whiten the columns by their RMS over r before the r x r statistics
        state["col_sq"].mul_(b2).add_(g.square().mean(0), alpha=1 - b2)
        w = 1 / ((state["col_sq"] / (1 - b2**t)).sqrt() + eps)
        g, m = g * w, m * w
        if samples is not None:
            samples = samples * w
    if samples is None:
        stat = g @ g.T
    else:  # [b, r, n] per-sample gradients: sum_i G_i G_i^T
        stat = torch.einsum("brn,bsn->rs", samples, samples)
    state["fisher"].mul_(b2).add_(stat, alpha=(1 - b2) / n)
    fhat = state["fisher"] / (1 - b2**t)
    if group["scale"] == "trace":
        mean_eig = torch.trace(fhat) / fhat.shape[0]
        fhat = fhat / mean_eig if bool(mean_eig > 0) else fhat
    step = inverse_power(fhat, group["damping"], group["exponent"]) @ m
    if "graft" in (group["scale"], group["n_side"]):
        adam = _rank_major(_adam_direction(state, b1, b2, eps), dim).float()
        axis = 0 if group["n_side"] == "graft" else None  # per column, or the whole tensor
        norm = step.norm(dim=axis, keepdim=axis is not None)
        step = step * torch.where(norm > 0, adam.norm(dim=axis, keepdim=axis is not None) / norm, 0.0)
    return step.reshape(p.movedim(dim, 0).shape).movedim(0, dim)


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


class _PerSampleGrads:
    """Per-sample gradients of the LoRA Linear factors, from forward / backward hooks (rank-major [b, r, n]).

    Kept until the next ``step`` (several backward passes before a step are concatenated along b). Factors that
    are not ``nn.Linear`` weights (embedding, Conv LoRA) fall back to the mini-batch Fisher.
    """

    def __init__(self, model: nn.Module, opt: AdaFish):
        factor_of = {id(p): g["factor"] for g in opt.param_groups if g["factor"] for p in g["params"]}
        self.grads: dict[Tensor, list[Tensor]] = {}
        self.masks: dict[Tensor, Tensor] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in factor_of:
                hook = self._hook(module.weight, factor_of[id(module.weight)])
                self._handles.append(module.register_forward_hook(hook))

    def _hook(self, weight: Tensor, factor: str):
        def forward_hook(module, inputs, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            act = inputs[0].detach()

            def on_grad(grad: Tensor) -> None:
                a = act.reshape(act.shape[0], -1, act.shape[-1]).float()
                gr = grad.reshape(grad.shape[0], -1, grad.shape[-1]).float()
                ps = torch.einsum("bto,bti->boi", gr, a)  # [b, out, in] = per-sample weight gradient
                if weight in self.masks:
                    ps = ps * self.masks[weight]
                self.grads.setdefault(weight, []).append(ps if factor == "A" else ps.transpose(1, 2))

            output.register_hook(on_grad)

        return forward_hook

    def pop(self, p: Tensor) -> Tensor | None:
        chunks = self.grads.pop(p, None)
        return torch.cat(chunks) if chunks else None

    def clear(self) -> None:
        self.grads.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
