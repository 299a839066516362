"""Adapter-agnostic parameter names: a mask file saved under one peft adapter name loads under any other (as
peft's own state dicts drop the adapter name)."""

from __future__ import annotations

from torch import nn


def adapter_of(model: nn.Module | None) -> str | None:
    """The active adapter name of a peft model (None for anything else)."""
    if model is None or not getattr(model, "peft_config", None):
        return None
    active = getattr(model, "active_adapter", None)
    return active if isinstance(active, str) else None


def agnostic_names(names: list[str], adapter: str | None) -> tuple[dict[str, tuple[str, int]], str | None]:
    """name -> (name without its last ``adapter`` segment, that segment's position or -1), and the adapter used.

    Falls back to the names as they are when stripping would make two names equal.
    """
    out = {}
    for name in names:
        parts = name.split(".")
        if adapter is None or adapter not in parts:
            out[name] = (name, -1)
            continue
        pos = len(parts) - 1 - parts[::-1].index(adapter)
        out[name] = (".".join(parts[:pos] + parts[pos + 1:]), pos)
    if adapter is None or len({a for a, _ in out.values()}) < len(out):
        return {n: (n, -1) for n in names}, None
    return out, adapter


def insert_adapter(name: str, adapter: str | None, pos: int) -> str:
    if pos < 0 or adapter is None:
        return name
    parts = name.split(".")
    return ".".join(parts[:pos] + [adapter] + parts[pos:])
