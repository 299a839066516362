"""FISH-Tuning: train only the PEFT entries with the highest Fisher information.

model -> compute_fisher -> select_mask -> MaskedOptimizer -> sparse adapter
"""

from .fisher import ZeroFisherWarning, compute_fisher, per_sample_log_likelihood
from .mask import FishMask, select_mask
from .methods import always_trainable, check_lora_init, peft_candidates
from .optim import MaskedOptimizer, SparseAdamW, make_optimizer

__version__ = "0.1.0"

__all__ = [
    "FishMask",
    "MaskedOptimizer",
    "SparseAdamW",
    "ZeroFisherWarning",
    "always_trainable",
    "check_lora_init",
    "compute_fisher",
    "make_optimizer",
    "peft_candidates",
    "per_sample_log_likelihood",
    "select_mask",
]
