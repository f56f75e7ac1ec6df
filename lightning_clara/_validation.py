"""Argument checks shared by the public classes: every message names the argument and its range."""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import Any

__all__ = ["check_choice", "check_in_range", "check_optional_positive", "check_positive_int"]


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    result = float(value)
    if math.isnan(result):
        raise ValueError(f"{name} must not be NaN")
    return result


def check_in_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a float in the interval (or raise); the message spells the interval out."""
    result = _as_float(name, value)
    below = result <= low if low_open else result < low
    above = result >= high if high_open else result > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return result


def check_optional_positive(name: str, value: Any) -> float | None:
    """``None`` or a finite float > 0."""
    if value is None:
        return None
    return check_in_range(name, value, 0.0, math.inf, low_open=True, high_open=True)


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1 (a NumPy integer too; bools refused), as a Python ``int``."""
    number = _as_int(name, value)
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return number


def check_non_negative_int(name: str, value: Any) -> int:
    """An integer >= 0 (a NumPy integer too; bools refused), as a Python ``int``."""
    number = _as_int(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):  # NumPy's bool_ is no Integral
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {sorted(choices)}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value
