"""A peft adapter directory with its FISH mask beside it, so continued training reloads both."""

from __future__ import annotations

import os
import shutil
import tempfile

from torch import nn

from ..mask import FishMask

FISH_MASK_NAME = "fish_mask.safetensors"


def save_adapter(model: nn.Module, mask: FishMask, directory: str | os.PathLike, **save_kwargs) -> str:
    """``model.save_pretrained(directory)`` plus ``fish_mask.safetensors`` next to the adapter files.

    The directory stays a normal peft adapter (``PeftModel.from_pretrained`` ignores the extra file). Every file
    is written to a staging folder and moved in with ``os.replace``, the mask last, so no file is ever half
    written and a directory that has the new mask also has the adapter it belongs to.
    Returns the mask file's path.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_adapter needs a peft / transformers model with save_pretrained, got {type(model).__name__}")
    mask.check(model)
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".fish_adapter.", dir=parent)  # same file system: os.replace is atomic
    try:
        model.save_pretrained(staging, **save_kwargs)
        for root, _, files in os.walk(staging):
            target = os.path.join(directory, os.path.relpath(root, staging))
            os.makedirs(target, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(target, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    path = os.path.join(directory, FISH_MASK_NAME)
    mask.save(path)
    return path


def load_adapter(
    base_model: nn.Module, directory: str | os.PathLike, is_trainable: bool = True, **peft_kwargs
) -> tuple[nn.Module, FishMask]:
    """``PeftModel.from_pretrained(base_model, directory)`` and the mask saved beside it, checked against it."""
    from peft import PeftModel

    directory = os.fspath(directory)
    path = os.path.join(directory, FISH_MASK_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no {FISH_MASK_NAME} in {directory}: save with ft.save_adapter(model, mask, dir) (or train with "
            "FishCallback, which writes it into every checkpoint)"
        )
    model = PeftModel.from_pretrained(base_model, directory, is_trainable=is_trainable, **peft_kwargs)
    return model, FishMask.load(path, model)
