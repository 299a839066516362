"""The FISH candidates of a model (what its PEFT method adds) and what stays fully trainable (gates, heads)."""

from __future__ import annotations

from torch import nn

from .adapters import adapters_parameters
from .peft import peft_parameters

SUPPORTED = ("peft: every tuner that adds parameters (LoRA, DoRA, (IA)³, LoHa, LoKr, VeRA, OFT, ..., Prefix / Prompt "
             "Tuning; table in README); adapters: seq_bn / double_seq_bn / par_bn Adapters, LoRA, IA3, prefix_tuning, "
             "UniPELT")


def _split(model: nn.Module) -> tuple[set[int], set[int]]:
    cand, gates = peft_parameters(model)
    a_cand, a_gates = adapters_parameters(model)
    gate_ids = {id(p) for p in gates + a_gates}
    return {id(p) for p in cand + a_cand} - gate_ids, gate_ids


def peft_candidates(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that the PEFT method adds (the FISH candidates), in model order.

    Works for a peft model (LoRA, DoRA, (IA)³, Prefix-Tuning) and for an ``adapters`` model (Adapter, LoRA, IA3,
    Prefix-Tuning, UniPELT). Heads and UniPELT gates are not candidates: see :func:`always_trainable`.
    """
    cand, _ = _split(model)
    names = [n for n, p in model.named_parameters() if id(p) in cand and p.requires_grad]
    if not names:
        raise ValueError(
            "peft_candidates found no trainable PEFT parameters: wrap the model with peft.get_peft_model(...) or "
            f"add and train an adapter with the adapters library (model.train_adapter(name)). Supported: {SUPPORTED}"
        )
    return names


def method_gates(model: nn.Module) -> list[str]:
    """Trainable gate parameters of the method (UniPELT's W_G for LoRA, Adapter and Prefix parts)."""
    _, gates = _split(model)
    return [n for n, p in model.named_parameters() if id(p) in gates and p.requires_grad]


def always_trainable(model: nn.Module) -> list[str]:
    """Trainable parameters outside the FISH budget: gates (e.g. UniPELT's W_G) and heads (``modules_to_save``).

    Pass them to ``select_mask(..., always_train=...)`` (as exact names, e.g. ``[re.escape(n) + "$" ...]``) or
    leave them out of the optimizer.
    """
    cand = set(peft_candidates(model))
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in cand]
