"""Compatibility shims between library versions (kept apart so the core reads as if they were not needed)."""

from __future__ import annotations

import functools
import inspect

from torch import nn


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
