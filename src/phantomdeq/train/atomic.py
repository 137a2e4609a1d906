"""Atomic file replacement for everything a run writes (checkpoints, ``metrics.jsonl`` rewrites,
``config.yaml``).

:func:`atomic_write` writes to a temporary file ``.<name>.<random>.tmp`` in the destination
folder, flushes and ``fsync``-s it, moves it into place with ``os.replace`` (atomic on POSIX
file systems) and ``fsync``-s the folder, so a reader or a process killed at any point sees
either the old file or the new one, never a mixture. The temporary file is created with mode
``0o666`` filtered by the process umask -- the permissions ``open()`` would give the file --
unlike ``tempfile.mkstemp``'s ``0o600``, which hides checkpoints from the group sharing a
project folder. A kill can leave a temporary file behind; :func:`sweep_temp_files` removes them
when a run starts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "sweep_temp_files", "temp_name"]


def temp_name(path: Path) -> Path:
    """A fresh temporary name next to ``path``: ``.<name>.<16 hex digits>.tmp``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Context manager yielding a file object; on a normal exit its content replaces ``path``
    atomically, on an exception (or a ``KeyboardInterrupt``) ``path`` is left untouched and the
    temporary file is removed. ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def sweep_temp_files(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Remove temporary files ``.<name>.*.tmp`` left in ``folder`` by a killed writer, for each
    of ``names``; returns the removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for name in names:
        for p in folder.glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
