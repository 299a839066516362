"""FISH-Tuning: train only the PEFT entries with the highest Fisher information.

model -> compute_fisher -> select_mask -> MaskedOptimizer -> sparse adapter
"""

from .adafish import AdaFish, lora_factors, make_adafish
from .config import FishConfig
from .fisher import ZeroFisherWarning, compute_fisher, per_sample_log_likelihood
from .guard import MaskGuard
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
from .optim import MaskedOptimizer, SparseAdamW, make_optimizer

__version__ = "0.1.0"

__all__ = [
    "AdaFish",
    "always_trainable",
    "baseline_budget",
    "calibration_indices",
    "calibration_loader",
    "check_lora_init",
    "compute_fisher",
    "FISH_MASK_NAME",
    "FishCallback",
    "FishConfig",
    "FishMask",
    "load_adapter",
    "lora_factors",
    "make_adafish",
    "make_optimizer",
    "MaskedOptimizer",
    "MaskGuard",
    "method_gates",
    "peft_candidates",
    "per_sample_log_likelihood",
    "prefix_tuning_compat",
    "save_adapter",
    "select_mask",
    "SparseAdamW",
    "top_layers",
    "ZeroFisherWarning",
]
