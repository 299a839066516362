"""FishCallback's ``fish/*`` figures in the Trainer's reporters (``--report_to tensorboard`` etc.)."""

from __future__ import annotations

from typing import Any


def attach_log_bridge(trainer: Any, fish: Any) -> Any:
    """``fish.attach_to(trainer)`` (kept for the command line's callers); returns ``fish``."""
    return fish.attach_to(trainer)
