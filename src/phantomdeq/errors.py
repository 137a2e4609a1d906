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


class CorrectionError(RuntimeError):
    """A fixed-point correction (:class:`~phantomdeq.grad.Correction`) asked for more states
    than the forward solve visited: it stopped after fewer evaluations of ``F`` than
    ``states`` (e.g. a warm-started solve converging at its first check). Nothing is recorded
    in place of the missing iterates."""
