"""Per-sample gradient rules, one per layer type (as opacus' ``grad_sample/*.py``), keyed by module class.

A rule knows which of its module's parameters it can differentiate (``params``) and, given the hook engine's
``tap``, registers forward hooks that hand the engine a tensor of the forward graph plus a function from that
tensor's gradient to each parameter's per-sample gradients ``[rows, *param.shape]`` (lazy, by row range, so the
engine can reduce in chunks). Nothing here is trusted blindly: the engine in :mod:`fish_tuning.per_sample`
checks every batch against autograd's summed gradient and probes once that rows are samples, and the driver falls
back to the exact per-sample loop otherwise. Rules only run on the exact math of the layer's forward, so each one
states the forward it assumes.

Built-in rules: ``nn.Linear`` (LoRA A/B), ``nn.Embedding`` (prompt-learning tables: Prompt / Prefix Tuning,
P-tuning), peft's (IA)³ ``Linear`` (``ia3_l``), DoRA's ``DoraLinearLayer`` magnitude and LoRA's ``Embedding``
(``lora_embedding_A/B``), and the ``adapters`` library's ``LoRA`` (UniPELT too). ``register_grad_sampler`` adds
more. The peft / adapters rules register on first use once that library is imported (``load_rules``), so
``import fish_tuning`` stays free of both.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

PerSample = Callable[[int, int], Tensor]  # rows lo:hi of the batch -> their gradients [hi - lo, *param.shape]
Compute = Callable[[Tensor], Mapping[str, PerSample]]  # gradient of the tapped tensor -> {label: PerSample}


class Tap(Protocol):
    def __call__(self, module: nn.Module, names: Mapping[str, str], rows: int, out: Tensor,
                 compute: Compute) -> None:
        """Record per-sample gradients of ``names`` ({label: candidate name}) once ``out``'s gradient arrives;
        ``rows`` is the leading (sample) dimension the rule saw, -1 if the inputs have none."""


@dataclass(frozen=True)
class GradSampler:
    params: Callable[[nn.Module], dict[str, Tensor]]  # label (attribute path in the module) -> parameter
    attach: Callable[[nn.Module, dict[str, str], Tap], list]  # -> hook handles (anything with remove())
    always: bool = False  # attach even without candidates of its own (it only makes other rules' inputs batch-first)


GRAD_SAMPLERS: dict[type, GradSampler | None] = {}  # None: explicitly unsupported (a subclass of a supported type)


def register_grad_sampler(*types: type, params: Callable[[nn.Module], dict[str, Tensor]], always: bool = False):
    """Decorator registering ``attach(module, names, tap) -> handles`` as the rule for ``types``."""
    def deco(attach):
        for t in types:
            GRAD_SAMPLERS[t] = GradSampler(params, attach, always)
        return attach
    return deco


_LAZY: dict[str, Callable[[], None]] = {}  # library -> registers its rules (run once the library is imported)


def load_rules() -> None:
    """Register the rules of every supported library that is imported by now (a model built with it is)."""
    for package in [p for p in _LAZY if p in sys.modules]:
        _LAZY.pop(package)()


def rule_for(module: nn.Module) -> GradSampler | None:
    """The rule of the most specific registered class of ``module`` (so a subclass can opt out with None)."""
    for cls in type(module).__mro__:
        if cls in GRAD_SAMPLERS:
            return GRAD_SAMPLERS[cls]
    return None


def resolve(module: nn.Module, label: str) -> Tensor:
    """The tensor at a dotted attribute path (``ia3_l.default``); under FSDP2 the unsharded one during forward."""
    return functools.reduce(getattr, label.split("."), module)


def lead_rows(t: Tensor, min_dim: int = 2) -> int:
    return t.shape[0] if t.dim() >= min_dim else -1


def _by_token(t: Tensor) -> Tensor:
    """[B, ..., F] -> [B, T, F] float32: the middle dimensions are positions of one sample."""
    return t.reshape(t.shape[0], -1, t.shape[-1]).float()


def _scale_grad(g: Tensor, u: Tensor, shape: torch.Size) -> PerSample:
    """Per-sample gradient of a vector s in ``out = u * s`` (s along the last dimension): Σ_t g_t ⊙ u_t."""
    g3, u3 = _by_token(g), _by_token(u)
    return lambda lo, hi: (g3[lo:hi] * u3[lo:hi]).sum(1).reshape(hi - lo, *shape)


# --------------------------------------------------------------------------------------------- nn.Linear
def _linear_params(m: nn.Linear) -> dict[str, Tensor]:
    return {a: getattr(m, a) for a in ("weight", "bias") if getattr(m, a, None) is not None}


@register_grad_sampler(nn.Linear, params=_linear_params)
def _linear(m: nn.Linear, names: dict[str, str], tap: Tap) -> list:
    """y = a Wᵀ + b: per-sample ∂W = Σ_t g_tᵀ a_t, ∂b = Σ_t g_t (opacus' linear rule)."""
    def hook(module, inputs, output):
        act = inputs[0].detach()

        def compute(grad: Tensor) -> dict[str, PerSample]:
            a, g = _by_token(act), _by_token(grad)
            out = {"weight": lambda lo, hi: torch.einsum("bto,bti->boi", g[lo:hi], a[lo:hi]),
                   "bias": lambda lo, hi: g[lo:hi].sum(1)}
            return {k: v for k, v in out.items() if k in names}

        tap(module, names, lead_rows(act), output, compute)
    return [m.register_forward_hook(hook)]


# --------------------------------------------------------------------------------------------- nn.Embedding
def _embedding_params(m: nn.Embedding) -> dict[str, Tensor]:
    # max_norm renormalises the table in place, scale_grad_by_freq rescales by batch counts: neither is per sample.
    ok = m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
    return {"weight": m.weight} if ok else {}


def _scatter_rows(idx: Tensor, g: Tensor, num: int, pad: int | None) -> PerSample:
    """Per-sample gradient of a table looked up at ``idx`` [B, ...]: sample b's output gradients added into the
    rows it looked up (``[B, num, D]``); the padding row gets none, as in ``F.embedding``."""
    idx2, g3 = idx.reshape(idx.shape[0], -1), _by_token(g)
    if pad is not None:
        g3 = g3 * (idx2 != pad).unsqueeze(-1)

    def per_sample(lo: int, hi: int) -> Tensor:
        out = g3.new_zeros(hi - lo, num, g3.shape[-1])
        return out.scatter_add_(1, idx2[lo:hi, :, None].expand(-1, -1, g3.shape[-1]), g3[lo:hi])
    return per_sample


@register_grad_sampler(nn.Embedding, params=_embedding_params)
def _embedding(m: nn.Embedding, names: dict[str, str], tap: Tap) -> list:
    """Prompt-learning tables look up per-sample prompt ids (peft expands them to ``[B, n_virtual]``)."""
    def hook(module, inputs, output):
        idx = inputs[0].detach()
        tap(module, names, lead_rows(idx, 1), output,
            lambda g: {"weight": _scatter_rows(idx, g, module.num_embeddings, module.padding_idx)})
    return [m.register_forward_hook(hook)]


# --------------------------------------------------------------------------------------------- peft
def _active_one(m: nn.Module, table: Mapping) -> str | None:
    """The single active adapter of a peft layer that owns ``table``, or None (merged, disabled, or several:
    their product / sum would need the others' values; the summed-gradient check then sends it to the loop)."""
    active = [a for a in m.active_adapters if a in table]
    return active[0] if len(active) == 1 and not m.disable_adapters and not m.merged else None


def _register_peft() -> None:
    """peft's layers (imported only when peft is: a peft model exists)."""
    try:
        from peft import PeftModel, PeftType
        from peft.tuners.ia3.layer import Linear as IA3Linear
        from peft.tuners.lora.dora import DoraEmbeddingLayer, DoraLinearLayer
        from peft.tuners.lora.layer import Embedding as LoraEmbedding
        from peft.utils.integrations import dequantize_module_weight
        from peft.utils.other import transpose
    except ImportError:  # pragma: no cover - peft is a dependency; a future layout just loses the rules
        return

    @register_grad_sampler(IA3Linear, params=lambda m: {f"ia3_l.{a}": p for a, p in m.ia3_l.items()})
    def _ia3(m: IA3Linear, names: dict[str, str], tap: Tap) -> list:
        """(IA)³: feed-forward layers compute base(x ⊙ l), so ∂l = Σ_t x_t ⊙ (∂ base input)_t; the others
        compute base(x) ⊙ l, so ∂l = Σ_t base(x)_t ⊙ g_t."""
        state: dict[str, object] = {}

        def pre(module, args, kwargs):
            state.clear()
            adapter = _active_one(module, module.ia3_l)
            x = args[0] if args else kwargs.get("x")
            if adapter is not None and f"ia3_l.{adapter}" in names and isinstance(x, Tensor):
                state["label"] = f"ia3_l.{adapter}"
                state["x"] = x.detach()

        def base_pre(base, args):  # feed-forward: the base layer's input is x ⊙ l
            if m.is_feedforward and "label" in state and args:
                label, x = state["label"], state["x"]
                shape = resolve(m, label).shape
                tap(m, {label: names[label]}, lead_rows(x), args[0], lambda g: {label: _scale_grad(g, x, shape)})

        def base_post(base, args, out):
            if not m.is_feedforward and "label" in state:
                state["u"] = out.detach()

        def post(module, args, kwargs, out):
            if "u" in state:
                label, u = state["label"], state["u"]
                shape = resolve(m, label).shape
                tap(m, {label: names[label]}, lead_rows(u), out, lambda g: {label: _scale_grad(g, u, shape)})
            state.clear()

        return [m.register_forward_pre_hook(pre, with_kwargs=True), m.base_layer.register_forward_pre_hook(base_pre),
                m.base_layer.register_forward_hook(base_post), m.register_forward_hook(post, with_kwargs=True)]

    @register_grad_sampler(DoraLinearLayer, params=lambda m: {"weight": m.weight})
    def _dora(m: DoraLinearLayer, names: dict[str, str], tap: Tap) -> list:
        """DoRA adds (m/‖W+sBA‖ - 1)·base + (m/‖W+sBA‖)·s·BAx to the base output, with the norm detached
        (peft follows the paper's §4.3), so ∂m = Σ_t g_t ⊙ (base_t + s·lora_t) / ‖W+sBA‖ (base without bias)."""
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs.get("x")
            if not isinstance(x, Tensor) or "lora_A" not in kwargs:  # not peft's call: the sum check will say so
                return
            x = x.detach()
            base_result = kwargs.get("base_result")
            base_result = None if base_result is None else base_result.detach()

            def compute(g: Tensor) -> dict[str, PerSample]:
                a, b, s, base = kwargs["lora_A"], kwargs["lora_B"], kwargs["scaling"], kwargs["base_layer"]
                with torch.no_grad():
                    weight = dequantize_module_weight(base).to(x.dtype)
                    lora_weight = module.get_lora_weight(lora_A=a, lora_B=b).to(x.dtype)
                    norm = module.get_weight_norm(weight=weight, lora_weight=lora_weight, scaling=s)
                    if base_result is None:
                        plain = nn.functional.linear(x, transpose(weight, module.fan_in_fan_out))
                    else:
                        plain = base_result if base.bias is None else base_result - base.bias
                    u = (plain + s * b(a(x))) / norm
                return {"weight": _scale_grad(g, u, module.weight.shape)}

            tap(module, names, lead_rows(x), out, compute)
        return [m.register_forward_hook(hook, with_kwargs=True)]

    GRAD_SAMPLERS[DoraEmbeddingLayer] = None  # returns (scale, result): no rule yet, the loop handles it

    def _lora_embedding_params(m: LoraEmbedding) -> dict[str, Tensor]:
        out = {f"lora_embedding_A.{a}": p for a, p in m.lora_embedding_A.items() if a not in m.lora_variant}
        out.update({f"lora_embedding_B.{a}": p for a, p in m.lora_embedding_B.items() if a not in m.lora_variant})
        return out

    @register_grad_sampler(LoraEmbedding, params=_lora_embedding_params)
    def _lora_embedding(m: LoraEmbedding, names: dict[str, str], tap: Tap) -> list:
        """Embedding LoRA adds s·c·(Aᵀ[x] Bᵀ) (c: the base layer's embed scale, if any): with h = Aᵀ[x],
        ∂B = s·c Σ_t g_tᵀ h_t (a Linear on h) and ∂A = (s·c g B) scattered into the looked-up columns of A."""
        def hook(module, args, kwargs, out):
            adapter = _active_one(module, module.lora_embedding_A)
            if adapter is None or getattr(module, "input_fns", {}).get(adapter) is not None:
                return
            if getattr(module, "output_fns", {}).get(adapter) is not None:
                return
            la, lb = f"lora_embedding_A.{adapter}", f"lora_embedding_B.{adapter}"
            mine = {k: names[k] for k in (la, lb) if k in names}
            if not mine:
                return
            idx = args[0] if args else kwargs.get("x")
            if not isinstance(idx, Tensor):
                return
            idx = idx.detach()

            @torch.no_grad()
            def compute(g: Tensor) -> dict[str, PerSample]:
                table_a, table_b = resolve(module, la), resolve(module, lb)  # [r, V], [D, r]
                c = module.scaling[adapter]
                scale = getattr(module, "_get_embed_scale", lambda: None)()  # Gemma-style scaled embeddings
                g = g.float() * (c if scale is None else c * scale.float())
                pad = module.get_base_layer().padding_idx
                got: dict[str, PerSample] = {}
                if lb in mine:
                    h, g3 = _by_token(module._embed(idx, table_a.T)), _by_token(g)
                    got[lb] = lambda lo, hi: torch.einsum("btd,btr->bdr", g3[lo:hi], h[lo:hi])
                if la in mine:
                    rows = _scatter_rows(idx, g @ table_b.float(), table_a.shape[1], pad)
                    got[la] = lambda lo, hi: rows(lo, hi).transpose(1, 2)
                return got

            tap(module, mine, lead_rows(idx, 1), out, compute)
        return [m.register_forward_hook(hook, with_kwargs=True)]

    @register_grad_sampler(PeftModel, params=lambda m: {}, always=True)
    def _prompt_rows(m: PeftModel, names: dict[str, str], tap: Tap) -> list:
        """Prompt / P-tuning: peft encodes the prompt ids of one row and repeats the result over the batch, so the
        prompt encoder never sees samples. While hooked, encode the ids expanded to every row instead (peft's
        former code path: the same values), so the Embedding / Linear rules of the encoder see ``[B, n]``."""
        original = m.get_prompt

        def get_prompt(batch_size: int, *args, **kwargs):
            cfg = m.active_peft_config
            if cfg.peft_type not in (PeftType.PROMPT_TUNING, PeftType.P_TUNING) or cfg.inference_mode:
                return original(batch_size, *args, **kwargs)
            enc = m.prompt_encoder[m.active_adapter]
            tokens = m.prompt_tokens[m.active_adapter].unsqueeze(0).expand(batch_size, -1)
            return enc(tokens.to(enc.embedding.weight.device))

        if not getattr(m.active_peft_config, "is_prompt_learning", False):
            return []
        handle = _Restore(m, "get_prompt")
        m.get_prompt = get_prompt
        return [handle]


class _Restore:
    """A hook handle that puts an instance attribute back as it was (absent: the class method shows through)."""

    _ABSENT = object()

    def __init__(self, obj: object, attr: str):
        self.obj, self.attr = obj, attr
        self.old = obj.__dict__.get(attr, self._ABSENT)

    def remove(self) -> None:
        if self.old is self._ABSENT:
            self.obj.__dict__.pop(self.attr, None)
        else:
            self.obj.__dict__[self.attr] = self.old


def _register_adapters() -> None:
    """The ``adapters`` library's LoRA (also UniPELT's): ``out = (drop(x) Aᵀ Bᵀ) · c`` with c its scaling, or
    under gating a per-sample gate [B, 1, 1] (returned beside the output); with h = x Aᵀ and ĝ = g·c,
    ∂B = Σ_t ĝ_tᵀ h_t and ∂A = Σ_t (ĝ_t B)ᵀ x_t."""
    try:
        from adapters.methods.lora import LoRA, MTLLoRA
    except ImportError:  # pragma: no cover - another layout of the library: its layers go to the loop
        return

    @register_grad_sampler(LoRA, params=lambda m: {"lora_A": m.lora_A, "lora_B": m.lora_B})
    def _adapters_lora(m: LoRA, names: dict[str, str], tap: Tap) -> list:
        def hook(module, args, output):
            x = args[0] if args and args[0] is not None else (args[1] if len(args) > 1 else None)
            if not isinstance(x, Tensor) or not isinstance(output, tuple) or module.training:
                return  # in training, dropout hides the x it used: the sum check sends it to the loop
            x, out, gate = x.detach(), output[0], output[1]

            def compute(g: Tensor) -> dict[str, PerSample]:
                c = gate.detach().float() if module.use_gating else module.scaling
                g3, x3 = _by_token(g * c), _by_token(x)
                h = x3 @ module.lora_A.detach().float().T
                gb = g3 @ module.lora_B.detach().float()
                got = {"lora_B": lambda lo, hi: torch.einsum("bto,btr->bor", g3[lo:hi], h[lo:hi]),
                       "lora_A": lambda lo, hi: torch.einsum("btr,bti->bri", gb[lo:hi], x3[lo:hi])}
                return {k: v for k, v in got.items() if k in names}

            tap(module, names, lead_rows(x), out, compute)
        return [m.register_forward_hook(hook)]

    GRAD_SAMPLERS[MTLLoRA] = None  # task-specific matrices between A and B: no rule yet


_LAZY.update(peft=_register_peft, adapters=_register_adapters)
