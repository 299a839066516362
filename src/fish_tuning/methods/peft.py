"""Candidates for peft tuners, read from peft's layer classes rather than guessed from names."""

from __future__ import annotations

import warnings

from torch import nn


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


def peft_candidates(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that the PEFT method adds (the FISH candidates), in model order.

    Supported: LoRA and DoRA (``lora_A``, ``lora_B``, ``lora_embedding_A/B``, ``lora_magnitude_vector``).
    Heads in ``modules_to_save`` are not candidates: see :func:`always_trainable`.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as err:  # pragma: no cover - peft is a core dependency
        raise ImportError("peft_candidates needs peft: pip install 'peft>=0.21'") from err

    wanted: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            wanted.update(id(p) for p in _lora_params(module))
    names = [n for n, p in model.named_parameters() if id(p) in wanted and p.requires_grad]
    if not names:
        raise ValueError(
            "peft_candidates found no trainable PEFT parameters: wrap the model with peft.get_peft_model(...) "
            "using a supported method (LoRA / DoRA)"
        )
    return names


def always_trainable(model: nn.Module) -> list[str]:
    """Trainable parameters outside the PEFT method (e.g. a ``modules_to_save`` classification head)."""
    cand = set(peft_candidates(model))
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in cand]


def check_lora_init(model: nn.Module) -> list[str]:
    """Warn before any Fisher pass when LoRA B factors are exactly zero (default init): A would get zero Fisher."""
    from peft.tuners.lora import LoraLayer

    zero_b = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter, lin in module.lora_B.items():
                if not bool(lin.weight.any()):
                    zero_b.append(f"{name}.lora_B.{adapter}")
    if zero_b:
        warnings.warn(
            f"{len(zero_b)} LoRA B factor(s) are all zero (e.g. {zero_b[0]}): with B = 0 every entry of A has zero "
            "gradient and zero Fisher, so FISH never trains A. Use LoraConfig(init_lora_weights='pissa').",
            stacklevel=2,
        )
    return zero_b
