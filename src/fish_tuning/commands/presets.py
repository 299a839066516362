"""Study presets (``configs/*.yaml``) addressable by name: ``fish-tune compare demo``.

The wheel carries them as ``fish_tuning/presets/*.yaml`` (hatch ``force-include`` of ``configs/``); a source
checkout or an editable install reads them from ``configs/`` at the repository root, so there is one copy.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def preset_dirs() -> list[Path]:
    """Folders searched for presets: the installed package data first, then a source checkout's configs/."""
    return [d for d in (_PACKAGE_DIR / "presets", _PACKAGE_DIR.parents[1] / "configs") if d.is_dir()]


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
