"""Type checks for option values, shared by every function that validates what a user passed."""

from __future__ import annotations

import math


def is_real(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)
