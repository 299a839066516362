"""FISH-Tuning: train only the PEFT entries with the highest Fisher information.

model -> compute_fisher -> select_mask -> MaskedOptimizer -> sparse adapter

The core (Fisher, masks, optimizers, candidates) is imported eagerly and needs only torch. The Trainer / TRL
integration and the adapter folder helpers pull in transformers' Trainer stack and peft, so they are loaded on
first use through the module ``__getattr__`` below (as peft does for its optional backends): ``import fish_tuning``
stays a small addition to ``import torch``.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .adafish import AdaFish
from .config import FishConfig
from .fisher import ZeroFisherWarning, compute_fisher
from .guard import MaskGuard
from .mask import FishMask
from .methods import always_trainable, peft_candidates
from .optim import MaskedOptimizer, SparseAdamW, make_optimizer
from .selection import select_mask

if TYPE_CHECKING:  # static type checkers and IDEs see the lazy names as ordinary imports
    from .integrations import FishCallback, calibration_loader, load_adapter, save_adapter

__version__ = "0.1.0"

# The "fish_tuning" logger follows transformers' verbosity (TrainingArguments(log_level=...),
# transformers.logging.set_verbosity_info()) and handler: its parent is the "transformers" logger. Until
# transformers configures that logger it is a plain pass-through to the root logger, so nothing changes for
# programs without transformers, and nothing is imported here.
logging.getLogger("fish_tuning").parent = logging.getLogger("transformers")

# name -> module that defines it; imported on first attribute access
_LAZY = {
    "save_adapter": ".integrations.adapter",
    "load_adapter": ".integrations.adapter",
    "calibration_loader": ".integrations.distributed",
    "FishCallback": ".integrations.trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [  # what a user needs; everything else is in its module (fish_tuning.methods, .adafish, .compat, ...)
    "AdaFish",
    "always_trainable",
    "calibration_loader",
    "compute_fisher",
    "FishCallback",
    "FishConfig",
    "FishMask",
    "load_adapter",
    "make_optimizer",
    "MaskedOptimizer",
    "MaskGuard",
    "peft_candidates",
    "save_adapter",
    "select_mask",
    "SparseAdamW",
    "ZeroFisherWarning",
]
