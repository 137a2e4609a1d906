"""Exceptions raised by phantomdeq."""

from __future__ import annotations

from typing import Any


class DEQError(RuntimeError):
    """A fixed-point solve or an implicit backward pass produced non-finite values.

    ``solution`` holds the :class:`~phantomdeq.Solution` of the failed solve when there is one
    (its ``nonfinite`` field marks the samples, the others' ``z`` are their solutions)."""

    def __init__(self, message: str, *, solution: Any = None) -> None:
        super().__init__(message)
        self.solution = solution
