"""Candidates for peft tuners (LoRA, DoRA, (IA)³, Prefix-Tuning), read from peft's classes, not guessed from names."""

from __future__ import annotations

import functools
import inspect
import warnings

from torch import nn

from .advice import EMBEDDING_ADVICE


def _lora_params(module: nn.Module) -> list[nn.Parameter]:
    """A, B (Linear / Conv / Embedding variants) and DoRA's magnitude for every adapter of one LoraLayer."""
    out = []
    for adapter in getattr(module, "active_adapters", None) or list(getattr(module, "lora_A", {}).keys()):
        for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
            container = getattr(module, attr, None)
            if container is not None and adapter in container:
                out.extend(p for p in container[adapter].parameters())
        for attr in ("lora_embedding_A", "lora_embedding_B"):
            container = getattr(module, attr, None)
            if container is not None and adapter in container:
                out.append(container[adapter])
    return out


def _ia3_params(module: nn.Module) -> list[nn.Parameter]:
    """The scaling vectors l (l_k, l_v on attention, l_ff on feed-forward inputs; Eq. 11-12) of one IA3Layer."""
    out = []
    for adapter in getattr(module, "active_adapters", None) or list(module.ia3_l.keys()):
        if adapter in module.ia3_l:
            out.append(module.ia3_l[adapter])
    return out


def peft_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(candidates, gates) of every peft tuner in ``model``; peft's tuners have no gates, so the second is empty.

    - LoRA / DoRA: ``lora_A``, ``lora_B``, ``lora_embedding_A/B``, ``lora_magnitude_vector`` (Eq. 7-8).
    - (IA)³: ``ia3_l`` of each IA3Layer (Eq. 11-12).
    - Prefix-Tuning: every parameter of the ``PrefixEncoder`` in ``model.prompt_encoder`` (Eq. 10). With
      ``prefix_projection=False`` (the default) that is the table holding P^K and P^V of all layers; with the
      projection it is the embedding plus the reparametrisation MLP (the only trainable tensors there are).
    """
    try:
        from peft.tuners.ia3 import IA3Layer
        from peft.tuners.lora import LoraLayer
        from peft.tuners.prefix_tuning import PrefixEncoder
    except ImportError:  # peft missing: a model without peft tuners has no peft candidates
        return [], []
    cand: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            cand.extend(_lora_params(module))
        elif isinstance(module, IA3Layer):
            cand.extend(_ia3_params(module))
        elif isinstance(module, PrefixEncoder):
            cand.extend(module.parameters())
    return cand, []


def check_lora_init(model: nn.Module) -> list[str]:
    """Warn before any Fisher pass when a LoRA factor pair has one side exactly zero: the other side then has
    zero gradient and zero Fisher, so FISH can never pick it.

    Linear / Conv LoRA starts with B = 0 (A scores zero) unless PiSSA-style init is used; embedding LoRA starts
    with ``lora_embedding_A`` = 0 (``lora_embedding_B`` scores zero) for every ``init_lora_weights``, PiSSA
    included. Returns the names of the all-zero factors.
    """
    from peft.tuners.lora import LoraLayer

    zero_b, zero_emb_a = [], []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter, lin in module.lora_B.items():
                if not bool(lin.weight.any()):
                    zero_b.append(f"{name}.lora_B.{adapter}")
            for adapter, param in getattr(module, "lora_embedding_A", {}).items():
                if not bool(param.any()):
                    zero_emb_a.append(f"{name}.lora_embedding_A.{adapter}")
    if zero_b:
        warnings.warn(
            f"{len(zero_b)} LoRA B factor(s) are all zero (e.g. {zero_b[0]}): with B = 0 every entry of A has zero "
            "gradient and zero Fisher, so FISH never trains A. Use LoraConfig(init_lora_weights='pissa').",
            stacklevel=2,
        )
    if zero_emb_a:
        warnings.warn(f"{len(zero_emb_a)} embedding LoRA factor(s) are all zero (e.g. {zero_emb_a[0]}): "
                      + EMBEDDING_ADVICE, stacklevel=2)
    return zero_b + zero_emb_a


def prefix_tuning_compat(model: nn.Module) -> nn.Module:
    """Let peft's Prefix-Tuning run on transformers 5 models whose forward names the KV cache ``cache``.

    peft 0.21 checks ``inspect.signature(forward)`` for a ``past_key_values`` argument and otherwise raises "Model
    does not support past key values"; transformers 5 renamed it ``cache`` (e.g. BERT). This gives the wrapped
    model's forward a ``past_key_values`` argument that is passed on as ``cache``. It changes nothing when the
    argument already exists (transformers 4.x, or peft's own backbone fallback), and is idempotent. Call it again
    after ``PeftModel.from_pretrained``. Returns ``model``.
    """
    base = getattr(model, "base_model", None)
    if base is None or not getattr(model, "peft_config", None):
        raise ValueError("prefix_tuning_compat expects a PeftModel from peft.get_peft_model(model, PrefixTuningConfig)")
    params = inspect.signature(base.forward).parameters
    if "past_key_values" in params or getattr(base.forward, "_fish_prefix_compat", False):
        return model
    backbone_name = getattr(model, "transformer_backbone_name", None)
    if backbone_name is not None:
        backbone = base.get_submodule(backbone_name)
        if "past_key_values" in inspect.signature(backbone.forward).parameters:
            return model  # peft's fallback path calls the backbone directly
    if "cache" not in params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"{type(base).__name__}.forward takes neither past_key_values nor cache: this model does "
                         "not support peft's Prefix-Tuning; use LoRA / (IA)³ or the adapters library's prefix_tuning")
    original = base.forward

    @functools.wraps(original)
    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)

    sig = inspect.signature(original)
    new = list(sig.parameters.values())
    where = next((i for i, p in enumerate(new) if p.kind is inspect.Parameter.VAR_KEYWORD), len(new))
    new.insert(where, inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None))
    forward.__signature__ = sig.replace(parameters=new)
    forward._fish_prefix_compat = True
    base.forward = forward
    return model
