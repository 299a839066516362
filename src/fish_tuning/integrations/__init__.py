"""Drop-in integrations: HF Trainer / TRL callback, adapter + mask directories, distributed calibration data."""

from .adapter import load_adapter, save_adapter
from .distributed import calibration_indices, calibration_loader
from .trainer import FishCallback
from .trainer_checks import innermost_optimizer

__all__ = [
    "FishCallback",
    "calibration_indices",
    "calibration_loader",
    "innermost_optimizer",
    "load_adapter",
    "save_adapter",
]
