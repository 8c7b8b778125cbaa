"""Validating the limits users pass, with errors that name the field."""

from __future__ import annotations

import math


def positive(field: str, value: object, whole: bool) -> float:
    """``value`` if it is a positive int (or, unless ``whole``, a finite number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an int" if whole else "a number"
        raise TypeError(f"{field} must be {kind}, got {type(value).__name__}")
    if whole and not isinstance(value, int):
        raise TypeError(f"{field} must be an int, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{field} must be greater than 0, got {value!r}")
    return value
