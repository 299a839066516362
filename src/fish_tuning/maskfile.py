"""Reading and verifying FishMask files, kept apart from :mod:`fish_tuning.mask` so that module stays small."""

from __future__ import annotations

import json
import os

from torch import Tensor

from .names import insert_adapter


def read_mask_file(path: str, fmt: str) -> tuple[dict, dict[str, Tensor]]:
    """The ``fish_mask`` metadata and index tensors of a safetensors file; every unreadable case is a clear error
    (a folder, a missing file, a damaged file, a file not written by ``FishMask.save``)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; pass the mask file inside it "
                                "(e.g. os.path.join(folder, 'fish_mask.safetensors'))")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("fish_mask")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        meta = json.loads(raw) if raw else None
    except Exception as err:  # safetensors raises several types for damaged headers/bodies
        raise ValueError(f"corrupt mask file {path}: {err}. Recreate it with select_mask(...).save()") from err
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f"corrupt mask file {path}: no fish-mask metadata (not written by FishMask.save)")
    return meta, tensors


def check_fingerprint(path: str, meta: dict, actual: str) -> None:
    """Refuse a file whose entries are not the ones it was saved with: range / order / count checks miss an index
    moved to a free neighbour, which would silently train other entries. Files without a fingerprint load."""
    recorded = meta.get("fingerprint")
    if recorded is not None and recorded != actual:
        raise ValueError(f"corrupt mask file {path}: fingerprint {actual} of its entries does not match the recorded "
                         f"{recorded} (damaged or edited); re-create or re-download it")


def saved_names(meta: dict) -> dict[str, str]:
    """Stored (adapter-agnostic) name -> the name the mask had when saved, under which its fingerprint was taken."""
    adapter = meta.get("adapter")
    stored = [*meta["shapes"], *meta.get("frozen", [])]
    if adapter is None:
        return {n: n for n in stored}
    return {n: insert_adapter(n, adapter["name"], adapter["pos"].get(n, -1)) for n in stored}
