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


def keep_cpu_4bit_trainable(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights; refuse a model already repacked.

    On a CPU with AVX512-bf16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight for its inference kernel the first
    time the layer runs in eval mode on an input without grad, and every backward after that gives wrong input
    gradients (measured: 115 % relative error in the LoRA gradients against the dequantised model). The Fisher
    pass runs in eval mode and a validation pass precedes training, so both would then be wrong. Call this on any
    4-bit model you load yourself before a Fisher pass or training on a CPU; :func:`load_quantized`, :func:`qpissa`,
    :func:`loftq_model`, ``fish-tune train --load_in_4bit``, :func:`~fish_tuning.compute_fisher` and ``FishCallback``
    (at train begin) do. bitsandbytes' own inverse of the repacking does
    not give the same gradients back (10 % off, measured), so a repacked model is refused: reload it.
    """
    repacked = []
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit" or not type(module).__module__.startswith("bitsandbytes"):
            continue
        module.support_avx512bf16_for_cpu = False
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            repacked.append(name)
    if repacked:
        raise ValueError(f"{len(repacked)} 4-bit layer(s) (e.g. {repacked[0]}) were repacked by bitsandbytes for CPU "
                         "inference (an eval-mode forward ran), after which their backward is wrong; reload the "
                         "model and call keep_cpu_4bit_trainable(model) (or load it with load_quantized) before "
                         "any forward")
