"""Which mask a resumed FishCallback run must keep, found from the checkpoint actually being resumed.

The mask rides in the optimizer's first param group (``optimizer.pt``) and, as a fingerprint, in the
``TrainerState`` that every checkpoint's ``trainer_state.json`` holds (also under ``save_only_model=True``, which
writes no optimizer state). ``Trainer.train(resume_from_checkpoint=...)`` tells callbacks nothing about the folder
it resumes, but it hands them the ``TrainerState`` read from that folder: the recorded fingerprint is therefore
the resumed checkpoint's own, and any mask file whose fingerprint differs is refused.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import TrainerState, TrainingArguments

from ..mask import FishMask
from .adapter import check_adapter_digest

MASK_GROUP_KEY = "fish_tuning_mask"
# Our entry in TrainerState.stateful_callbacks, a plain dict saved with every trainer_state.json. Not a callback
# class name: with restore_callback_states_from_checkpoint=True transformers would otherwise replace the user's
# FishCallback by a new instance built from the saved entry (losing candidates=, loglik_fn=, and the user's handle).
STATE_KEY = "FishCallbackMask"
_FIX = "FishCallback(mask=FishMask.load('<checkpoint>/fish_mask.safetensors'))"


def saved_state(optimizer: torch.optim.Optimizer, lr_scheduler=None) -> dict | None:
    """The mask state a resumed checkpoint restored: in the optimizer's first param group, or (FSDP2) the scheduler."""
    saved = optimizer.param_groups[0].get(MASK_GROUP_KEY)
    return saved if saved is not None else getattr(lr_scheduler, MASK_GROUP_KEY, None)


def record(args: TrainingArguments, state: TrainerState, mask: FishMask) -> None:
    """Put the mask's fingerprint (and where its checkpoints go) into the state every checkpoint saves."""
    if state.stateful_callbacks is None:
        state.stateful_callbacks = {}
    state.stateful_callbacks[STATE_KEY] = {"fingerprint": mask.fingerprint(), "num_selected": mask.num_selected,
                                           "output_dir": os.path.abspath(args.output_dir)}


def recorded_fingerprint(state: TrainerState) -> str | None:
    """The fingerprint the resumed checkpoint's trainer_state.json recorded (None: older or not FishCallback's)."""
    entry = (state.stateful_callbacks or {}).get(STATE_KEY)
    return entry.get("fingerprint") if isinstance(entry, dict) else None


def check_given(given: FishMask, state: TrainerState, optimizer: torch.optim.Optimizer, lr_scheduler=None) -> None:
    """Refuse a ``mask=`` that is not the interrupted run's, by its optimizer state or its recorded fingerprint."""
    saved = saved_state(optimizer, lr_scheduler)
    wanted = FishMask.from_state(saved).fingerprint() if saved is not None else recorded_fingerprint(state)
    if wanted is not None and wanted != given.fingerprint():
        raise ValueError(
            f"resuming at step {state.global_step} with a mask that is not the interrupted run's (the checkpoint "
            f"records mask {wanted}, this one is {given.fingerprint()}): its entries trained under that mask, so "
            "switching would freeze some moved entries and train others from stale state. Pass the checkpoint's "
            f"mask ({_FIX}) or no mask at all, or start a new run without resume_from_checkpoint.")


def load_resumed(args: TrainingArguments, state: TrainerState, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler=None) -> FishMask:
    """The interrupted run's mask: from the optimizer (or LR scheduler) state the Trainer just loaded, else
    (``save_only_model=True``) the mask file whose fingerprint the resumed checkpoint's state recorded."""
    step, wanted = state.global_step, recorded_fingerprint(state)
    saved = saved_state(optimizer, lr_scheduler)
    if saved is not None:
        mask = FishMask.from_state(saved)
        if wanted is not None and mask.fingerprint() != wanted:
            raise ValueError(f"the checkpoint resumed at step {step} is inconsistent: its optimizer state holds mask "
                             f"{mask.fingerprint()}, its trainer_state.json records {wanted}. Pass {_FIX}")
        mask.check(model)
        return mask
    if wanted is None:
        raise FileNotFoundError(
            f"resuming at step {step}, but nothing identifies the checkpoint's FISH mask (no mask in its optimizer "
            "state, none recorded in its trainer_state.json): it was not written with FishCallback, or by an older "
            f"version with save_only_model=True. Pass the mask of the interrupted run: {_FIX}")
    entry = state.stateful_callbacks[STATE_KEY]
    folders = list(dict.fromkeys(os.path.join(d, f"checkpoint-{step}")
                                 for d in (entry.get("output_dir"), os.path.abspath(args.output_dir)) if d))
    for folder in folders:  # save_only_model: the checkpoint's own folder is not known, its mask's fingerprint is
        path = os.path.join(folder, FishMask.FILE_NAME)
        if os.path.exists(path):
            mask = FishMask.load(path, model)
            if mask.fingerprint() == wanted:
                check_adapter_digest(folder, mask)
                return mask
    raise FileNotFoundError(
        f"resuming at step {step} from a checkpoint without optimizer state (save_only_model=True): its mask "
        f"(fingerprint {wanted}) is not in {' or '.join(folders)}. The Trainer does not tell callbacks which folder "
        f"it resumes; pass that checkpoint's mask: {_FIX}")
