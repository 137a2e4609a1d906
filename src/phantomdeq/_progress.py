"""Progress bars on stderr: tqdm when it is installed (the ``train`` extra), else none.

A command asked for a progress bar without tqdm installed says so once and runs without it;
with progress off, tqdm is never imported.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from ._extras import is_available, missing_message

__all__ = ["NullBar", "progress_bar"]

_noted = False


class NullBar:
    """Stands in for a tqdm bar: every method does nothing."""

    def update(self, n: int = 1) -> None:
        """Nothing to update."""

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""


def progress_bar(*, enabled: bool, auto: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar writing to stderr (``tqdm.auto`` when ``auto``) with ``kwargs``, or a
    :class:`NullBar` when ``enabled`` is false or tqdm is not installed (then a one-line note
    on stderr, once per process)."""
    global _noted
    if not enabled:
        return NullBar()
    if not is_available("tqdm"):
        if not _noted:
            _noted = True
            note = missing_message(["tqdm"], "it")
            print(f"phantomdeq: no progress bar: {note}", file=sys.stderr)
        return NullBar()
    module = importlib.import_module("tqdm.auto" if auto else "tqdm")
    return module.tqdm(file=sys.stderr, **kwargs)
