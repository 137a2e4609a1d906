"""The public registries of user solvers and estimators (``pdq.solvers.register``,
``pdq.grad.register``): the checks a registered class passes, shared by both."""

from __future__ import annotations

import re
from typing import Any

from ._options import keyword_options

__all__ = ["check_registration", "defines"]

_NAME = re.compile(r"[a-z][a-z0-9_]*")


def defines(cls: type, attribute: str) -> bool:
    """Whether ``cls`` or a base other than ``object`` defines ``attribute``."""
    return any(attribute in vars(c) for c in cls.__mro__ if c is not object)


def check_registration(
    registry: dict[str, Any], builtins: frozenset[str], name: object, cls: object, what: str
) -> str:
    """``name`` if ``cls`` may be registered under it in ``registry``: ``name`` a lower-case
    identifier that is not a built-in's (``builtins``) nor another class's; ``cls`` a class
    with keyword-only options. ``ValueError``/``TypeError`` naming the argument otherwise."""
    owner = f"phantomdeq.{what}.register"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{owner}: name must be a lower-case identifier (letters, digits, '_'), got {name!r}"
        )
    if name in builtins:
        raise ValueError(
            f"{owner}: name {name!r} is a built-in of phantomdeq.{what} ({', '.join(sorted(builtins))}); "
            "choose another name"
        )
    if not isinstance(cls, type):
        raise TypeError(f"{owner}: cls must be a class, got {type(cls).__name__} {cls!r}")
    old = registry.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"{owner}: name {name!r} is already registered for {old.__module__}.{old.__qualname__}; "
            "choose another name"
        )
    try:
        opts = keyword_options(cls)
    except (TypeError, ValueError, NameError) as exc:
        raise TypeError(
            f"{owner}: cls {cls.__name__}: cannot read its constructor ({exc})"
        ) from exc
    if not opts:
        raise TypeError(
            f"{owner}: cls {cls.__name__} declares no keyword-only options; its constructor must "
            "declare them after '*' (def __init__(self, *, max_iter: int = 30, ...)): the "
            "config, --set and from_name take the options from there"
        )
    return name
