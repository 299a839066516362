"""Drop-in integrations: HF Trainer / TRL callback, adapter + mask directories, distributed calibration data."""

from .adapter import FISH_MASK_NAME, load_adapter, save_adapter
from .distributed import calibration_indices, calibration_loader
from .trainer import FishCallback
from .trainer_checks import innermost_optimizer

__all__ = [
    "FISH_MASK_NAME",
    "FishCallback",
    "calibration_indices",
    "calibration_loader",
    "innermost_optimizer",
    "load_adapter",
    "save_adapter",
]
