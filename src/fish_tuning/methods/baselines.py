"""Fixed-proportion baselines of the paper: a method on the top N layers, and its trainable count as a FISH budget.

The paper compares e.g. LoRA on the top 1-4 layers ("Original") with FISH on the top 5 layers given exactly the
same number of trainable entries, and (IA)³ on 3/5/8/10 layers with FISH over all 12. So:

    base_cfg = top_layers(LoraConfig(...), 4, model=model)       # the baseline
    fish_cfg = top_layers(LoraConfig(...), 5, model=model)       # where FISH may choose
    k = baseline_budget(model, base_cfg)                         # entries the baseline trains
    mask = ft.select_mask(fisher, budget=k)                         # FISH trains exactly as many
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..mask import layer_of
from .adapters import is_adapters_config, meta_skeleton, with_leave_out
from .candidates import peft_candidates


def num_layers_of(model: nn.Module) -> int:
    """Number of transformer layers from ``model.config`` (``num_hidden_layers`` / ``n_layer`` / ``num_layers``)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot read the number of layers of {type(model).__name__} from its config: pass num_layers=")


def _layers(n: int, total: int) -> list[int]:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"n must be an integer layer count in [1, {total}] (the model's layers), got {n!r}")
    return list(range(total - n, total))


def _require_base_model(model: nn.Module) -> nn.Module:
    """``model`` itself, refusing a PeftModel: the baseline needs the base model's own module names (before injection)."""
    if getattr(model, "peft_config", None) and hasattr(model, "get_base_model"):
        raise ValueError("pass the base model (before peft.get_peft_model), not a PeftModel: its module names "
                         "already contain the injected tuner layers")
    return model


def top_layers(config_or_model: Any, n: int, model: nn.Module | None = None, *, num_layers: int | None = None):
    """Restrict a PEFT method to the ``n`` layers nearest the output.

    Signatures:
    - ``top_layers(model, n) -> list[int]``: the indices of the top ``n`` layers (``layers_to_transform``).
    - ``top_layers(LoraConfig, n, model=base | num_layers=L) -> LoraConfig``: copy with ``layers_to_transform``
      (LoRA and DoRA; ``target_modules`` must be a list or None, as peft ignores layer indices for a regex).
    - ``top_layers(IA3Config, n, model=base) -> IA3Config``: copy whose ``target_modules`` and
      ``feedforward_modules`` are the full names of the matching modules in those layers (peft's IA3Config has no
      ``layers_to_transform``). ``model`` is the base model before ``get_peft_model``.
    - ``top_layers(adapters config or name, n, model=base | num_layers=L)``: copy with ``leave_out`` = all lower
      layers (seq_bn, double_seq_bn, prefix_tuning, lora, unipelt: every part of the union).
    peft's Prefix-Tuning has no per-layer option and raises; use adapters' prefix_tuning for that.
    """
    if isinstance(config_or_model, nn.Module):
        return _layers(n, num_layers or num_layers_of(config_or_model))
    config = config_or_model
    total = num_layers or (num_layers_of(model) if model is not None else None)
    if total is None:
        raise ValueError("top_layers needs the layer count: pass model= (the base model) or num_layers=")
    keep = _layers(n, total)
    if is_adapters_config(config):
        return with_leave_out(config, [i for i in range(total) if i not in keep])
    kind = type(config).__name__
    if kind == "LoraConfig":
        if isinstance(config.target_modules, str):
            raise ValueError("top_layers(LoraConfig): target_modules is a regex, which peft matches without "
                             "layers_to_transform; give target_modules as a list of module names")
        return dataclasses.replace(copy.deepcopy(config), layers_to_transform=keep)
    if kind == "IA3Config":
        if model is None:
            raise ValueError("top_layers(IA3Config, n, model=base_model): (IA)³ layers are chosen by module name, "
                             "so the base model is needed")
        return _ia3_top(config, set(keep), _require_base_model(model))
    if kind == "PrefixTuningConfig":
        raise ValueError("peft's PrefixTuningConfig puts prefixes in every layer (no per-layer option); use the "
                         "adapters library's prefix_tuning, whose leave_out top_layers sets")
    raise TypeError(f"top_layers does not support {kind}: give a peft LoraConfig / IA3Config, an adapters config "
                    "(or its name, e.g. 'seq_bn'), or a model to get layer indices")


def _ia3_top(config, keep: set[int], model: nn.Module):
    from peft.tuners.ia3 import IA3Model
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    config = copy.deepcopy(config)
    model_type = getattr(model.config, "model_type", None)
    if config.target_modules is None:
        if model_type not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            raise ValueError(f"no default (IA)³ targets for model_type {model_type!r}: set IA3Config(target_modules=)")
        config.target_modules = list(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type])
    if config.feedforward_modules is None:
        config.feedforward_modules = list(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, []))
    targets, ff = [], []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or layer_of(name + ".") not in keep:
            continue
        if check_target_module_exists(config, name):
            targets.append(name)
            if IA3Model._check_target_module_feedforward(config, name):
                ff.append(name)
    if not targets:
        raise ValueError(f"top_layers(IA3Config): no target module of {config.target_modules} in layers "
                         f"{sorted(keep)} of {type(model).__name__}")
    config.target_modules, config.feedforward_modules = targets, ff
    return config


def baseline_budget(model: nn.Module, config: Any) -> int:
    """Number of candidate entries a baseline trains: what the method adds under ``config``, heads and gates excluded.

    ``model`` is the base model (peft) or any model of the architecture (adapters); ``config`` is a peft config
    (LoRA / DoRA / (IA)³ / Prefix-Tuning) or an adapters config or name. The baseline is built on the meta device,
    so this costs no memory and leaves ``model`` untouched. Give the result to ``select_mask(scores, budget=...)``
    so the FISH mask trains exactly as many entries as the baseline (heads / gates are always trainable in both).
    """
    if is_adapters_config(config):
        skeleton = meta_skeleton(model, config)
    else:
        skeleton = _peft_skeleton(_require_base_model(model), config)
    named = dict(skeleton.named_parameters())
    return sum(math.prod(named[n].shape) for n in peft_candidates(skeleton))


def _peft_skeleton(model: nn.Module, config) -> nn.Module:
    from peft import get_peft_model

    config = copy.deepcopy(config)
    if getattr(config, "init_lora_weights", True) is not True:
        config.init_lora_weights = True  # PiSSA / LoftQ need real weights (SVD); counts do not depend on init
    with torch.device("meta"):
        skeleton = type(model)(model.config)
        return get_peft_model(skeleton, config)
