"""FISH-Tuning: train only the PEFT entries with the highest Fisher information.

model -> compute_fisher -> select_mask -> MaskedOptimizer -> sparse adapter
"""

from .adafish import AdaFish, lora_factors, make_adafish
from .fisher import ZeroFisherWarning, compute_fisher, per_sample_log_likelihood
from .mask import FishMask, select_mask
from .methods import always_trainable, check_lora_init, peft_candidates
from .optim import MaskedOptimizer

__version__ = "0.1.0"

__all__ = [
    "AdaFish",
    "FishMask",
    "MaskedOptimizer",
    "ZeroFisherWarning",
    "always_trainable",
    "check_lora_init",
    "compute_fisher",
    "lora_factors",
    "make_adafish",
    "peft_candidates",
    "per_sample_log_likelihood",
    "select_mask",
]
