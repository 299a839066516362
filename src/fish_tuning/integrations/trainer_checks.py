"""What FishCallback checks about the Trainer it runs in: the optimizer chain, the backend, the output folder."""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from torch import nn
from transformers import TrainingArguments

from ..guard import MaskGuard
from ..mask import FishMask
from ..sharded import is_sharded
from ..zero3 import zero_optimizer


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that really steps, below accelerate's ``AcceleratedOptimizer`` and similar wrappers."""
    if optimizer is None:
        raise ValueError("FishCallback got no optimizer from the Trainer (on_train_begin is called after it is built)")
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"FishCallback needs a torch.optim optimizer to hook, got {type(optimizer).__name__}")
    return optimizer


def check_supported(args: TrainingArguments, model: nn.Module | None, optimizer=None):
    """Refuse set-ups the mask cannot be kept under; returns the ZeRO optimizer under DeepSpeed, else None."""
    optim = str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", "")) or "")
    if optim in ("lomo", "adalomo"):
        raise NotImplementedError(
            f"FishCallback cannot mask optim={optim!r}: LOMO updates each parameter inside backward and never calls "
            "an optimizer step, so the step hooks that keep masked entries fixed would never run. Use adamw_torch "
            "(or any optimizer with a step).")
    backend = _accelerate_backend()
    if getattr(args, "deepspeed", None) or backend == "DEEPSPEED":
        zero = zero_optimizer(optimizer)
        if zero is None:
            raise NotImplementedError(
                "FishCallback supports DeepSpeed with ZeRO stages 1-3 (\"zero_optimization\": {\"stage\": 1, 2 or "
                "3}): without ZeRO, DeepSpeed's fp16/bf16 optimizer keeps flat fp32 masters FISH does not map, so weight "
                "decay there would move masked entries. Use a ZeRO stage (configs/ds_zero3_offload.json) or DDP."
            )
        if model is None:
            raise ValueError("FishCallback got no model from the Trainer")
        return zero
    if backend == "FSDP" and not (model is not None and is_sharded(model)):
        raise NotImplementedError(
            "FishCallback supports FSDP version 2 only (fsdp_config={'fsdp_version': 2}, or fsdp_version: 2 in the "
            "accelerate config): FSDP1 flattens parameters into FlatParameters, which the per-tensor mask does not "
            "line up with. FSDP2 (DTensor shards) and DDP work."
        )
    if getattr(args, "fsdp", None) and backend != "FSDP" and model is not None and not is_sharded(model):
        warnings.warn("FishCallback: TrainingArguments ask for FSDP but accelerate did not shard the model (accelerate "
                      "turns FSDP on only on GPUs and similar devices; on a CPU it runs DDP); FISH trains it as DDP",
                      stacklevel=3)
    if model is None:
        raise ValueError("FishCallback got no model from the Trainer")


def check_kept_in_optimizer(mask: FishMask, guard: MaskGuard) -> None:
    """The Trainer steps one optimizer: a candidate with kept entries outside it (so outside the guard built on its
    tensors) would silently never train."""
    guarded = set(guard.local_mask.names.values())
    for name in mask.names:
        if mask.indices[name].numel() and name not in guarded:
            raise ValueError(
                f"FishCallback: mask candidate '{name}' keeps {mask.indices[name].numel()} entries but is not in the "
                "Trainer's optimizer, so they would never train. Put every candidate in the optimizer (e.g. "
                "optimizers=(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), None)), or select "
                "the mask without it (FishCallback(exclude=...))."
            )


def check_writable(folder: str) -> None:
    """Fail at train begin, before any work, when the mask could not be written at train end."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fish_write_check."):
            pass
    except OSError as err:
        raise PermissionError(f"FishCallback: output_dir {folder!r} is not writable ({err.strerror}); the mask and "
                              "checkpoints could not be saved. Choose a writable output_dir (or "
                              "save_strategy='no' and FishCallback(save_final_mask=False)).") from None


def _accelerate_backend() -> str | None:
    """accelerate's distributed type name (e.g. set by ``accelerate launch --use_fsdp``), if it is initialised."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - transformers' Trainer requires accelerate
        return None
    if not AcceleratorState._shared_state:
        return None
    return getattr(AcceleratorState().distributed_type, "name", None)
