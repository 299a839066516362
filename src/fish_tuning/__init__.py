"""FISH-Tuning: train only the PEFT entries with the highest Fisher information.

model -> compute_fisher -> select_mask -> MaskedOptimizer -> sparse adapter
"""

from .adafish import AdaFish, lora_factors, make_adafish
from .fisher import ZeroFisherWarning, compute_fisher, per_sample_log_likelihood
from .integrations import (
    FISH_MASK_NAME,
    FishCallback,
    calibration_indices,
    calibration_loader,
    load_adapter,
    save_adapter,
)
from .mask import FishMask, select_mask
from .methods import (
    always_trainable,
    baseline_budget,
    check_lora_init,
    method_gates,
    peft_candidates,
    prefix_tuning_compat,
    top_layers,
)
from .optim import MaskedOptimizer, MaskGuard

__version__ = "0.1.0"

__all__ = [
    "FISH_MASK_NAME",
    "FishCallback",
    "MaskGuard",
    "calibration_indices",
    "calibration_loader",
    "load_adapter",
    "save_adapter",
    "AdaFish",
    "FishMask",
    "MaskedOptimizer",
    "ZeroFisherWarning",
    "always_trainable",
    "baseline_budget",
    "check_lora_init",
    "compute_fisher",
    "method_gates",
    "lora_factors",
    "make_adafish",
    "peft_candidates",
    "per_sample_log_likelihood",
    "prefix_tuning_compat",
    "select_mask",
    "top_layers",
]
