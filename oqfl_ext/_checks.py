"""Argument checks shared by the package: one wording for every "expected an integer" error."""

from __future__ import annotations

import operator
from typing import Optional

__all__ = ["check_int"]


def check_int(name: str, value, *, minimum: Optional[int] = None,
              maximum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """``value`` as a Python int when it is an integer (not a bool: ``True`` is not a count)
    within ``[minimum, maximum]`` (either bound optional), or None when ``allow_none`` and it
    is None. Otherwise a ValueError naming ``name`` and what was expected, e.g. "rounds
    expected a non-negative integer, got -1"."""
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)   # int, numpy and torch integer scalars; never a float
    except TypeError:
        v = None
    if v is None or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} expected {_expected(minimum, maximum, allow_none)}, "
                         f"got {value!r:.80}")
    return v


def _expected(minimum: Optional[int], maximum: Optional[int], allow_none: bool) -> str:
    if minimum is not None and maximum is not None:
        what = f"an integer in [{minimum}, {maximum}]"
    elif minimum == 1:
        what = "a positive integer"
    elif minimum == 0:
        what = "a non-negative integer"
    elif minimum is not None:
        what = f"an integer >= {minimum}"
    elif maximum is not None:
        what = f"an integer <= {maximum}"
    else:
        what = "an integer"
    return ("None or " if allow_none else "") + what
