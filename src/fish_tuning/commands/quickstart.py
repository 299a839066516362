"""`fish-tune quickstart`: the README's quick-start data (examples/data: reviews.csv, reviews_dev.csv, sft.jsonl)
written into a folder, so the README's commands run as written from an installed wheel too.

The wheel carries the files as ``fish_tuning/quickstart/`` (hatch ``force-include`` of ``examples/data``); a
source checkout reads them from ``examples/data`` at the repository root, so there is one copy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
FILES = ("reviews.csv", "reviews_dev.csv", "sft.jsonl")


def source_dir() -> Path:
    for folder in (_PACKAGE_DIR / "quickstart", _PACKAGE_DIR.parents[1] / "examples" / "data"):
        if all((folder / name).is_file() for name in FILES):
            return folder
    raise FileNotFoundError("the quick-start data is not in this installation (fish_tuning/quickstart); reinstall "
                            "fish-tuning")


def write(target: str | os.PathLike = "examples/data") -> list[Path]:
    """Copy the files into ``target`` (created); a file already there with other content is refused, not
    overwritten. Returns the paths written or found identical."""
    src, out = source_dir(), Path(target)
    clash = [out / n for n in FILES if (out / n).exists() and (out / n).read_bytes() != (src / n).read_bytes()]
    if clash:
        raise FileExistsError(f"{clash[0]} exists with other content; choose another folder (--dir) or move it")
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if not (out / name).exists():
            shutil.copyfile(src / name, out / name)
    return [out / n for n in FILES]
