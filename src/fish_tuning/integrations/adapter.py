"""A peft adapter directory with its FISH mask beside it, so continued training reloads both."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile

from torch import nn

from ..mask import FishMask
from ..names import adapter_of

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_CONFIG_NAME = "adapter_config.json"
# A Trainer output_dir holds its checkpoints: their adapters are not the output_dir's own
_SKIP_DIR = re.compile(r"^(\..*|checkpoint-\d+)$")
_DIGEST_KEYS = ("adapter_files", "stale_adapter_files")


def adapter_digest(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of every peft adapter weight file under ``directory`` (relative path -> hex digest).

    Trainer checkpoint folders (``checkpoint-N``) and hidden folders below ``directory`` are skipped: they come
    and go (rotation, staging) independently of the adapter saved in ``directory`` itself.
    """
    out = {}
    directory = os.fspath(directory)
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not _SKIP_DIR.match(d))
        for name in sorted(files):
            if name in _ADAPTER_FILES:
                h = hashlib.sha256()
                with open(os.path.join(root, name), "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                out[os.path.relpath(os.path.join(root, name), directory)] = h.hexdigest()
    return out


def without_digests(mask: FishMask) -> FishMask:
    """``mask`` without the adapter digests of the folder it was read from (they describe that folder only)."""
    if not any(k in mask.meta for k in _DIGEST_KEYS):
        return mask
    return dataclasses.replace(mask, meta={k: v for k, v in mask.meta.items() if k not in _DIGEST_KEYS})


def _save_with_digest(folder: str | os.PathLike, mask: FishMask, model: nn.Module | None, key: str) -> str:
    mask = without_digests(mask)
    digest = adapter_digest(folder)
    if digest:
        mask = dataclasses.replace(mask, meta={**mask.meta, key: digest})
    path = os.path.join(os.fspath(folder), FishMask.FILE_NAME)
    mask.save(path, model=model)
    return path


def save_mask_beside_adapter(folder: str | os.PathLike, mask: FishMask, model: nn.Module | None = None) -> str:
    """Write ``mask`` into ``folder`` with a digest of the adapter weight files there (checked on load/resume).

    For a Trainer's ``output_dir`` call it after ``trainer.save_model``: the digest then names the new adapter.
    """
    return _save_with_digest(folder, mask, model, "adapter_files")


def save_mask_before_adapter(folder: str | os.PathLike, mask: FishMask, model: nn.Module | None = None) -> str:
    """Write ``mask`` into ``folder`` whose adapter is not saved yet (a Trainer's output_dir at train end).

    The adapter files already there belong to an earlier run: their digests are recorded as stale, so that
    :func:`check_adapter_digest` refuses them if the new adapter never arrives (the run died before
    ``trainer.save_model``), while the adapter that ``save_model`` writes next is accepted.
    """
    return _save_with_digest(folder, mask, model, "stale_adapter_files")


def check_adapter_digest(directory: str | os.PathLike, mask: FishMask) -> None:
    """Refuse adapter weights that are not the ones the mask was saved with (e.g. an interrupted save).

    Every recorded file must match, and no other adapter weight file may sit beside them (peft would load a
    stale ``adapter_model.safetensors`` before a recorded ``adapter_model.bin``); files recorded as stale (an
    adapter older than the mask) are refused.
    """
    directory = os.fspath(directory)
    recorded, stale = mask.meta.get("adapter_files"), mask.meta.get("stale_adapter_files")
    if not recorded and not stale:
        return
    found = adapter_digest(directory)
    for rel, digest in (stale or {}).items():
        if found.get(rel) == digest:
            raise ValueError(
                f"{os.path.join(directory, rel)} is older than the {FishMask.FILE_NAME} beside it (the run that "
                "wrote the mask ended before its adapter was saved, e.g. killed before trainer.save_model): save the "
                "trained adapter and its mask with ft.save_adapter(model, mask, directory)")
    if not recorded:
        return
    for rel, digest in recorded.items():
        if found.get(rel) != digest:
            raise ValueError(
                f"{os.path.join(directory, rel)} is not the adapter that {FishMask.FILE_NAME} was saved with "
                "(the directory mixes two saves, e.g. an interrupted save_adapter): save the adapter and its mask "
                "again with ft.save_adapter(model, mask, directory)"
            )
    folders = {os.path.dirname(rel) for rel in recorded} | {""}
    extra = sorted(rel for rel in found if rel not in recorded and os.path.dirname(rel) in folders)
    if extra:
        raise ValueError(
            f"{os.path.join(directory, extra[0])} was not saved with {FishMask.FILE_NAME} (a leftover of an older "
            "save in the other format, which peft may load instead): remove it, or save the adapter and its mask again "
            "with ft.save_adapter(model, mask, directory)")


def save_adapter(model: nn.Module, mask: FishMask, directory: str | os.PathLike, **save_kwargs) -> str:
    """``model.save_pretrained(directory)`` plus ``fish_mask.safetensors`` next to the adapter files.

    The directory stays a normal peft adapter (``PeftModel.from_pretrained`` ignores the extra file). Every file
    is written to a staging folder and moved in with ``os.replace``, then adapter weight files of an older save
    that this one did not write (the other format) are removed, and the mask moves in last. The mask records a
    digest of the adapter weight files and adapter-agnostic names, so :func:`load_adapter` refuses a directory
    where an interrupted save left new weights beside an old mask, and the pair loads under any adapter name.
    peft saves an adapter named other than ``default`` into ``directory/<name>/``: the mask goes there too.
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
        name = adapter_of(model)
        sub = name if name and name != "default" and os.path.isdir(os.path.join(staging, name)) else ""
        mask = without_digests(mask)
        mask = dataclasses.replace(mask, meta={**mask.meta, "adapter_files": adapter_digest(os.path.join(staging, sub))})
        mask.save(os.path.join(staging, sub, FishMask.FILE_NAME), model=model)
        staged = [os.path.relpath(os.path.join(root, f), staging) for root, _, files in os.walk(staging) for f in files]
        mask_rel = os.path.join(sub, FishMask.FILE_NAME)
        for rel in [r for r in staged if r != mask_rel]:
            os.makedirs(os.path.dirname(os.path.join(directory, rel)), exist_ok=True)
            os.replace(os.path.join(staging, rel), os.path.join(directory, rel))
        weight_dirs = {os.path.dirname(r) for r in staged if os.path.basename(r) in _ADAPTER_FILES} | {sub}
        for rel in (os.path.join(d, f) for d in sorted(weight_dirs) for f in _ADAPTER_FILES):
            if rel not in staged and os.path.isfile(os.path.join(directory, rel)):
                os.remove(os.path.join(directory, rel))  # peft would load it before the new file
        os.replace(os.path.join(staging, mask_rel), os.path.join(directory, mask_rel))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(directory, sub, FishMask.FILE_NAME)


def _pair_folder(directory: str, adapter_name: str) -> str:
    """The folder holding both the adapter and its mask: ``directory``, ``directory/<adapter_name>`` (where peft
    saves a named adapter), or the only subfolder that holds both; ``directory`` when none does."""
    def pair(folder: str) -> bool:
        return all(os.path.isfile(os.path.join(folder, f)) for f in (_CONFIG_NAME, FishMask.FILE_NAME))

    if pair(directory) or not os.path.isdir(directory):
        return directory
    if pair(os.path.join(directory, adapter_name)):
        return os.path.join(directory, adapter_name)
    subs = sorted(d for d in os.listdir(directory) if pair(os.path.join(directory, d)) and not _SKIP_DIR.match(d))
    return os.path.join(directory, subs[0]) if len(subs) == 1 else directory


def load_adapter(
    base_model: nn.Module, directory: str | os.PathLike, is_trainable: bool = True, adapter_name: str = "default",
    **peft_kwargs,
) -> tuple[nn.Module, FishMask]:
    """``PeftModel.from_pretrained(base_model, directory)`` and the mask saved beside it, checked against it.

    The mask's names are mapped to ``adapter_name``; adapter weights that are not the ones saved with the mask
    are refused. A named adapter that :func:`save_adapter` wrote into ``directory/<name>/`` is found there.
    """
    from peft import PeftModel

    if isinstance(base_model, PeftModel):
        raise TypeError("load_adapter takes the base model, not a PeftModel (it adds the adapter itself): pass the "
                        "plain transformers model, e.g. AutoModelForSequenceClassification.from_pretrained(base)")
    directory = _pair_folder(os.fspath(directory), adapter_name)
    path = os.path.join(directory, FishMask.FILE_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no {FishMask.FILE_NAME} in {directory}: save with ft.save_adapter(model, mask, dir) (or train with "
            "FishCallback, which writes it into every checkpoint)"
        )
    mask = FishMask.load(path, adapter_name=adapter_name)
    check_adapter_digest(directory, mask)
    model = PeftModel.from_pretrained(base_model, directory, is_trainable=is_trainable, adapter_name=adapter_name,
                                      **peft_kwargs)
    mask.check(model)
    return model, mask
