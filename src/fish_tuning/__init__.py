"""FISH-Tuning: train only the PEFT entries with the highest Fisher information.

model -> compute_fisher -> select_mask -> MaskedOptimizer -> sparse adapter
"""

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
from .methods import always_trainable, check_lora_init, peft_candidates
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
    "FishMask",
    "MaskedOptimizer",
    "ZeroFisherWarning",
    "always_trainable",
    "check_lora_init",
    "compute_fisher",
    "peft_candidates",
    "per_sample_log_likelihood",
    "select_mask",
]
