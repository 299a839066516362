"""PEFT methods the compare runner can wrap a model with; ``register_method`` lets new methods plug in.

A builder gets the base model and a :class:`PeftSpec` and returns the peft-wrapped model. The runner counts the
budget from :func:`fish_tuning.peft_candidates` of the result, so a new method only has to be a peft tuner whose
parameters ``peft_candidates`` recognises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class PeftSpec:
    rank: int
    layers: list[int] | None  # None: every layer
    target_modules: list[str]
    task_type: str  # "SEQ_CLS" or "CAUSAL_LM"


Builder = Callable[[nn.Module, PeftSpec], nn.Module]
METHODS: dict[str, Builder] = {}


def register_method(name: str, builder: Builder) -> None:
    """Make ``methods: [name]`` available in compare configs."""
    METHODS[name] = builder


def _lora(model: nn.Module, spec: PeftSpec, use_dora: bool = False) -> nn.Module:
    """Paper settings: alpha = 2 r, PiSSA init (so B != 0 and A gets Fisher information), no dropout."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=list(spec.target_modules),
                     lora_dropout=0.0, init_lora_weights="pissa", use_dora=use_dora, task_type=spec.task_type,
                     layers_to_transform=spec.layers)
    return get_peft_model(model, cfg)


register_method("lora", _lora)
register_method("dora", lambda model, spec: _lora(model, spec, use_dora=True))


def default_targets(model: nn.Module) -> list[str]:
    """Attention projections: q/k/v of BERT-style (``query``) or LLaMA-style (``q_proj``) models."""
    leaf = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for group in (["query", "key", "value"], ["q_proj", "k_proj", "v_proj"], ["c_attn"]):
        if all(g in leaf for g in group):
            return group
    raise ValueError("could not guess the attention modules of this model: set target_modules in the config "
                     f"(linear layers seen: {sorted(leaf)[:12]})")


def layer_indices(model: nn.Module, n: int | None) -> list[int] | None:
    """Indices of the top ``n`` transformer layers (None: all layers), via
    :func:`fish_tuning.methods.baselines.top_layers`."""
    if n is None:
        return None
    from fish_tuning.methods import top_layers as layers_of

    try:
        return layers_of(model, n)
    except ValueError as err:
        raise ValueError(f"{err}: lower 'budgets' / 'fish_layers' in the config") from err
