"""Candidates for the ``adapters`` library: bottleneck Adapters, LoRA / (IA)³, Prefix-Tuning and UniPELT.

``adapters`` is optional (it pins transformers 4.x) and imported lazily. A model can only carry adapters' layers
after ``import adapters``, so when the module is not loaded the model has none and nothing is imported here.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

INSTALL_HINT = "pip install 'fish-tuning[adapters]'"


def require_adapters():
    """Import and return the ``adapters`` module, or raise an ImportError that says how to install it."""
    try:
        import adapters
    except ImportError as err:
        raise ImportError(
            f"this needs the 'adapters' library (Adapter / UniPELT / adapters' Prefix-Tuning): {INSTALL_HINT}. "
            "It requires transformers 4.x, so install it in a separate environment from peft on transformers 5."
        ) from err
    return adapters


def adapters_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(candidates, gates) of every adapters-library module in ``model``.

    Candidates, per method (the parameters each one adds; FISH-Tuning section 4):
    - bottleneck ``Adapter`` (seq_bn, double_seq_bn, par_bn, the UniPELT adapter): down- and up-projection A, B with
      their biases (Eq. 9), plus adapter-internal layer norms / learned scaling when configured;
    - ``LoRA`` (and its DoRA magnitude ``m``) and ``IA3`` vectors, incl. the UniPELT LoRA part (Eq. 7, 11-12);
    - ``PrefixTuning`` / ``FlatPrefixTuning``: the prefix table and its reparametrisation MLP (Eq. 10).
    Gates: the ``gate`` of Adapter / LoRA / IA3 and ``prefix_gates`` of prefix layers (UniPELT's W_G). They are
    not candidates: they train fully, outside the FISH budget.
    """
    if sys.modules.get("adapters") is None:  # not imported (or blocked): the model cannot carry adapters layers
        return [], []
    from adapters.methods.lora import IA3, LoRA
    from adapters.methods.modeling import Adapter
    from adapters.methods.prefix_tuning import FlatPrefixTuning, PrefixTuning, PrefixTuningLayer

    cand: list[nn.Parameter] = []
    gates: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, (Adapter, LoRA, IA3)):
            gate = getattr(module, "gate", None)
            gate_ids = {id(p) for p in gate.parameters()} if isinstance(gate, nn.Module) else set()
            for p in module.parameters():
                (gates if id(p) in gate_ids else cand).append(p)
        elif isinstance(module, (PrefixTuning, FlatPrefixTuning)):
            cand.extend(module.parameters())
        elif isinstance(module, PrefixTuningLayer):
            gates.extend(module.prefix_gates.parameters())
    return cand, gates


def resolve_config(config: Any):
    """An adapters config object from a config or its registry name (``"seq_bn"``, ``"unipelt"``, ...)."""
    adapters = require_adapters()
    if isinstance(config, str):
        return adapters.AdapterConfig.load(config)
    return config


def is_adapters_config(config: Any) -> bool:
    if isinstance(config, str):
        return True  # peft configs are objects; a name can only be an adapters registry key
    mod = sys.modules.get("adapters")
    return mod is not None and isinstance(config, mod.AdapterConfig)


def with_leave_out(config: Any, leave_out: list[int]):
    """A copy of an adapters config (UniPELT: every part of the union) that skips the layers in ``leave_out``."""
    return resolve_config(config).replace(leave_out=list(leave_out))


def meta_skeleton(model: nn.Module, config: Any) -> nn.Module:
    """A parameter-free (meta device) copy of ``model``'s architecture carrying an adapters ``config``."""
    import torch

    adapters = require_adapters()
    # adapters.init() swaps in a dynamic subclass (module "abc") with mixins: rebuild from the real model class.
    cls = next(c for c in type(model).__mro__ if c.__module__ != "abc" and not c.__name__.endswith("Mixin"))
    with torch.device("meta"):
        skeleton = cls(model.config)
        if not hasattr(skeleton, "adapters_config"):
            adapters.init(skeleton)
        skeleton.add_adapter("fish_baseline", config=resolve_config(config))
        skeleton.train_adapter("fish_baseline")
    return skeleton
