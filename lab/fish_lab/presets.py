"""Study presets (``configs/*.yaml`` of the repository) addressable by name: ``python -m fish_lab compare demo``.

The lab runs from a source checkout, so the presets are read where they are: one copy, in ``configs/``.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def preset_dirs() -> list[Path]:
    """Folders searched for presets: the repository's configs/."""
    return [CONFIGS] if CONFIGS.is_dir() else []


def list_presets() -> list[str]:
    """Names of every preset (file stems), sorted."""
    return sorted({p.stem for d in preset_dirs() for p in d.glob("*.yaml")})


def resolve_config(spec: str | os.PathLike) -> Path:
    """An existing file as given, else the preset of that name (``demo`` or ``demo.yaml``).

    Raises FileNotFoundError naming the presets when neither exists, so a typo gets the list to choose from.
    """
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent in (Path("."), Path("configs")):  # "configs/demo.yaml" as in the README, outside a checkout
        for folder in preset_dirs():
            cand = folder / f"{name}.yaml"
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"config {os.fspath(spec)!r} is neither a file nor a preset; give a YAML file or a "
                            f"preset name: {', '.join(list_presets()) or '(none installed)'}")
