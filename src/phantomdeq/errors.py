"""Exceptions raised by phantomdeq."""


class DEQError(RuntimeError):
    """A fixed-point solve or an implicit backward pass produced non-finite values."""
