"""The one exception type of the data package.

Every problem with data files, folders or the options that select data (a truncated IDX or
image file, a missing directory, ``train_size`` larger than the set, a planted pickle) raises
:class:`DataError`, whose message is a single line naming the file, folder or option and what
is expected. A command line catches it and prints that line (exit status 2).
"""

from __future__ import annotations

__all__ = ["DataError", "DataFileNotFoundError", "one_line"]


def one_line(text: object) -> str:
    """``str(text)`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class DataError(ValueError):
    """A data problem; ``str(exc)`` is one line naming the file, folder or option."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or directory is missing (also a :class:`FileNotFoundError`, so code that
    catches missing files keeps working)."""
