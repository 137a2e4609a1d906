"""Option validation shared by the library: wrong types raise ``TypeError``, wrong values
``ValueError``, and every message names the owner, the option and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _where(owner: str, name: str) -> str:
    return f"{owner}: {name}" if owner else name


def check_int(name: str, value: object, *, minimum: int, owner: str = "") -> int:
    """An ``int`` (not a ``bool``) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{_where(owner, name)} must be an integer >= {minimum}, got {type(value).__name__} "
            f"{value!r}"
        )
    if value < minimum:
        raise ValueError(f"{_where(owner, name)} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    owner: str = "",
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (``int`` or ``float``, not ``bool``) in the given interval."""
    lo = "(" if low_open or low == -math.inf else "["
    hi = ")" if high_open or high == math.inf else "]"
    interval = f"{lo}{low}, {high}{hi}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{_where(owner, name)} must be a finite number in {interval}, got "
            f"{type(value).__name__} {value!r}"
        )
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{_where(owner, name)} must be a finite number in {interval}, got {v!r}")
    bad = (v <= low if low_open else v < low) or (v >= high if high_open else v > high)
    if bad:
        raise ValueError(f"{_where(owner, name)} must be in {interval}, got {value!r}")
    return v


def check_bool(name: str, value: object, *, owner: str = "") -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"{_where(owner, name)} must be True or False, got {type(value).__name__} {value!r}"
        )
    return value


def check_choice(name: str, value: object, choices: Sequence[str], *, owner: str = "") -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(
            f"{_where(owner, name)} must be one of {tuple(choices)}, got "
            f"{type(value).__name__} {value!r}"
        )
    if value not in choices:
        raise ValueError(f"{_where(owner, name)} must be one of {tuple(choices)}, got {value!r}")
    return value
