"""A peft adapter directory with its FISH mask beside it, so continued training reloads both."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile

from torch import nn

from ..mask import FishMask

FISH_MASK_NAME = FishMask.FILE_NAME
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_digest(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of every peft adapter weight file under ``directory`` (relative path -> hex digest)."""
    out = {}
    directory = os.fspath(directory)
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if name in _ADAPTER_FILES:
                h = hashlib.sha256()
                with open(os.path.join(root, name), "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                out[os.path.relpath(os.path.join(root, name), directory)] = h.hexdigest()
    return out


def check_adapter_digest(directory: str | os.PathLike, mask: FishMask) -> None:
    """Refuse adapter weights that are not the ones the mask was saved with (e.g. an interrupted save)."""
    recorded = mask.meta.get("adapter_files")
    if not recorded:
        return
    found = adapter_digest(directory)
    for rel, digest in recorded.items():
        if found.get(rel) != digest:
            raise ValueError(
                f"{os.path.join(os.fspath(directory), rel)} is not the adapter that {FISH_MASK_NAME} was saved with "
                "(the directory mixes two saves, e.g. an interrupted save_adapter): save the adapter and its mask "
                "again with ft.save_adapter(model, mask, directory)"
            )


def save_adapter(model: nn.Module, mask: FishMask, directory: str | os.PathLike, **save_kwargs) -> str:
    """``model.save_pretrained(directory)`` plus ``fish_mask.safetensors`` next to the adapter files.

    The directory stays a normal peft adapter (``PeftModel.from_pretrained`` ignores the extra file). Every file
    is written to a staging folder and moved in with ``os.replace``, the mask last. The mask records a digest of
    the adapter weight files and adapter-agnostic names, so :func:`load_adapter` refuses a directory where an
    interrupted save left new weights beside an old mask, and the pair loads under any adapter name.
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
        mask = dataclasses.replace(mask, meta={**mask.meta, "adapter_files": adapter_digest(staging)})
        mask.save(os.path.join(staging, FISH_MASK_NAME), model=model)
        staged = [(root, name) for root, _, files in os.walk(staging) for name in files if name != FISH_MASK_NAME]
        for root, name in staged + [(staging, FISH_MASK_NAME)]:
            target = os.path.normpath(os.path.join(directory, os.path.relpath(root, staging)))
            os.makedirs(target, exist_ok=True)
            os.replace(os.path.join(root, name), os.path.join(target, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(directory, FISH_MASK_NAME)


def load_adapter(
    base_model: nn.Module, directory: str | os.PathLike, is_trainable: bool = True, adapter_name: str = "default",
    **peft_kwargs,
) -> tuple[nn.Module, FishMask]:
    """``PeftModel.from_pretrained(base_model, directory)`` and the mask saved beside it, checked against it.

    The mask's names are mapped to ``adapter_name``; adapter weights that are not the ones saved with the mask
    are refused.
    """
    from peft import PeftModel

    directory = os.fspath(directory)
    path = os.path.join(directory, FISH_MASK_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no {FISH_MASK_NAME} in {directory}: save with ft.save_adapter(model, mask, dir) (or train with "
            "FishCallback, which writes it into every checkpoint)"
        )
    mask = FishMask.load(path, adapter_name=adapter_name)
    check_adapter_digest(directory, mask)
    model = PeftModel.from_pretrained(base_model, directory, is_trainable=is_trainable, adapter_name=adapter_name,
                                      **peft_kwargs)
    mask.check(model)
    return model, mask
