"""Argument checks shared by the public API: one message per kind of mistake, naming the argument."""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """A true integer (numpy integers included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: object, name: str) -> int:
    if not is_int(value) or int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def unit_interval(value: object, name: str, what: str = "a number in [0, 1]") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) <= 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)
