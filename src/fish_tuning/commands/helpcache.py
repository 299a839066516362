"""``fish-tune train --help`` / ``mask --help`` without importing transformers: the text is built once (the
parser holds every ``TrainingArguments`` flag, whose import takes seconds) and cached, keyed by the versions of
fish-tuning and transformers and the source of the flag definitions, so any change rebuilds it."""

from __future__ import annotations

import hashlib
import importlib
import os
from importlib import metadata
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SOURCES = [*sorted(_HERE.glob("*.py")), _HERE.parent / "config.py"]  # every flag definition, whichever file


def _key(command: str) -> str:
    digest = hashlib.sha256(command.encode())
    for name in ("fish-tuning", "transformers", "peft", "trl"):
        try:
            digest.update(metadata.version(name).encode())
        except metadata.PackageNotFoundError:
            digest.update(b"-")
    for path in _SOURCES:
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:16]


def _cache_file(command: str) -> Path:
    root = Path(os.environ.get("FISH_CACHE", Path.home() / ".cache" / "fish-tuning"))
    return root / "help" / f"{command}-{_key(command)}.txt"


def help_text(command: str) -> str:
    """The command's --help text, from the cache when it is there (a cache that cannot be written is skipped)."""
    path = _cache_file(command)
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    module = importlib.import_module(f"fish_tuning.commands.{command}")
    text = module.parser().parser.format_help()
    try:
        from ..files import atomic_write_text

        atomic_write_text(path, text)
    except OSError:
        pass
    return text
