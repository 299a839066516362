"""FishCallback's ``fish/*`` figures in the Trainer's reporters (``--report_to tensorboard`` etc.).

A callback cannot call ``Trainer.log``, and reporters run their ``on_log`` before user callbacks, so a bridge
placed first in the callback list adds the figures to the ``logs`` dict of the first log after train begin,
where every reporter sees them.
"""

from __future__ import annotations

from typing import Any


def attach_log_bridge(trainer: Any, fish: Any) -> Any:
    """Put a bridge for ``fish`` (a FishCallback in ``trainer``) at the head of ``trainer``'s callbacks."""
    from transformers import TrainerCallback

    class FishLogBridge(TrainerCallback):
        def __init__(self):
            self.pending = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.pending = True  # FishCallback fills fish.stats later in this same event

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.pending and logs is not None and fish.stats:
                logs.update(fish.stats)
                self.pending = False

    bridge = FishLogBridge()
    trainer.callback_handler.callbacks.insert(0, bridge)
    return bridge
