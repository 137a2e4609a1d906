"""Optional dependencies: which extra of ``pip install 'phantomdeq[...]'`` brings each one.

The core (``DEQ``, solvers, estimators, diagnostics, ``nn``) needs torch and numpy only. The
commands need more: a missing module is reported as one line naming the extra to install
(:func:`missing_message`), never as a raw ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

__all__ = [
    "OPTIONAL_MODULES",
    "is_available",
    "missing_message",
    "missing_modules",
    "top_module",
]

#: top-level module -> (distribution name, extra that installs it)
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "yaml": ("PyYAML", "train"),
    "pydantic": ("pydantic", "train"),
    "tqdm": ("tqdm", "train"),
    "sklearn": ("scikit-learn", "train"),
    "PIL": ("Pillow", "train"),
    "matplotlib": ("matplotlib", "plots"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "torchdeq": ("torchdeq", "peer"),
}


def is_available(module: str) -> bool:
    """Whether the top-level ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed installation
        return False


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported, in order."""
    return [m for m in modules if not is_available(m)]


def missing_message(modules: Iterable[str], what: str) -> str:
    """One line: ``what`` needs the missing ``modules`` and the ``pip install`` that brings
    them, e.g. ``this command needs pydantic, PyYAML (not installed): pip install
    'phantomdeq[train]'``. Every other package of the same extras that is missing too is named
    as well (``...; also missing from phantomdeq[train]: tqdm, Pillow``), so one install
    brings all that the message lists."""
    names = list(dict.fromkeys(modules))
    listed = ", ".join(OPTIONAL_MODULES.get(m, (m, ""))[0] for m in names)
    extras = sorted({OPTIONAL_MODULES[m][1] for m in names if m in OPTIONAL_MODULES})
    if not extras:
        return f"{what} needs {listed} (not installed)"
    install = f"pip install 'phantomdeq[{','.join(extras)}]'"
    others = [
        dist
        for mod, (dist, extra) in OPTIONAL_MODULES.items()
        if extra in extras and mod not in names and not is_available(mod)
    ]
    if not others:
        return f"{what} needs {listed} (not installed): {install}"
    also = f"also missing from phantomdeq[{','.join(extras)}]: {', '.join(others)}"
    return f"{what} needs {listed} (not installed; {also}): {install}"


def top_module(exc: ModuleNotFoundError) -> str | None:
    """The top-level name of the module a ``ModuleNotFoundError`` could not find."""
    return None if exc.name is None else exc.name.split(".")[0]
