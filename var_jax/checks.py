"""The one checker of numeric arguments and config fields a user can get wrong.

Every module that validates a count, a size or a positive number calls these, so the rule (bools
are not numbers, a count is an int, zero is not positive) and the wording of the error ("NAME
must be a positive int, got VALUE") are the same everywhere.
"""

from __future__ import annotations

import numbers


def positive_int(name: str, value) -> int:
    """``value`` as an int if it is an integer >= 1 (not a bool); else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def non_negative_int(name: str, value) -> int:
    """``value`` as an int if it is an integer >= 0 (not a bool); else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def positive_number(name: str, value) -> float:
    """``value`` as a float if it is a real number > 0 (not a bool, not NaN); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def non_negative_number(name: str, value) -> float:
    """``value`` as a float if it is a finite real number >= 0 (not a bool); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
