"""Candidates for peft tuners (LoRA, DoRA, (IA)³, Prefix-Tuning), read from peft's classes, not guessed from names."""

from __future__ import annotations

import warnings

from torch import nn

from .advice import EMBEDDING_ADVICE


def _tuner_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a peft tuner layer declares as its adapter weights (``adapter_layer_names``), for its
    active adapters: LoRA's A / B / embedding factors and DoRA's magnitude, (IA)³ vectors, LoHa / LoKr factors,
    VeRA's scaling vectors, OFT / BOFT blocks, ... New peft methods need no code here."""
    adapters = getattr(module, "active_adapters", None)
    if isinstance(adapters, str):
        adapters = [adapters]
    out = []
    for attr in getattr(module, "adapter_layer_names", ()):
        container = getattr(module, attr, None)
        if container is None:
            continue
        for adapter in adapters if adapters is not None else list(container.keys()):
            if adapter not in container:
                continue
            item = container[adapter]
            out.extend([item] if isinstance(item, nn.Parameter) else item.parameters())
    return out


def _prompt_params(model: nn.Module) -> list[nn.Parameter]:
    """Prompt-learning methods (Prefix-Tuning, Prompt Tuning, P-Tuning) keep their table in ``prompt_encoder``."""
    encoders = getattr(model, "prompt_encoder", None)
    if not isinstance(encoders, nn.ModuleDict):
        return []
    active = getattr(model, "active_adapter", None)
    names = [active] if isinstance(active, str) and active in encoders else list(encoders.keys())
    return [p for name in names for p in encoders[name].parameters()]


def peft_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(candidates, gates) of every peft tuner in ``model``; only LLaMA-Adapter (adaption prompt) has a gate.

    Candidates are what each ``BaseTunerLayer`` declares in ``adapter_layer_names`` (e.g. LoRA / DoRA:
    ``lora_A``, ``lora_B``, ``lora_embedding_A/B``, ``lora_magnitude_vector``, Eq. 7-8; (IA)³: ``ia3_l``, Eq.
    11-12), plus the prompt encoder of prompt-learning methods (Prefix-Tuning's P^K, P^V table, Eq. 10, or its
    reparametrisation MLP). ``modules_to_save`` heads are not tuner layers: they stay always-trainable.
    """
    try:
        from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft missing: a model without peft tuners has no peft candidates
        return [], []
    cand: list[nn.Parameter] = []
    gates: list[nn.Parameter] = []
    seen: set[int] = set()

    def add(params, into: list[nn.Parameter]) -> None:
        for p in params:
            if id(p) not in seen:  # shared tensors (e.g. VB-LoRA's vector bank) count once
                seen.add(id(p))
                into.append(p)

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            add(_tuner_params(module), cand)
        elif isinstance(module, _BaseAdaptedAttention):  # LLaMA-Adapter: prompts are candidates, its gate is not
            add([module.adaption_prompt], cand)
            add([module.adaption_gate], gates)
    add(_prompt_params(model), cand)
    return cand, gates


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
