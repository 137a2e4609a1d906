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

A write that the environment refuses (disk full, a file-size limit, a quota, a read-only file
system, no permission) raises :class:`OutputWriteError` -- an ``OSError`` whose message names the
file, the cause in words and what to do -- also when the ``OSError`` reaches it wrapped in another
exception (``torch.save`` reports a failed write as ``RuntimeError: [enforce fail at
inline_container.cc...]``, the ``OSError`` only in its context). The destination is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "OutputWriteError",
    "atomic_write",
    "find_os_error",
    "output_write_error",
    "sweep_temp_files",
    "temp_name",
]

#: what each environment failure means for a file a run writes, and what to do about it
_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space there"),
    errno.EFBIG: (
        "file too large for the file-size limit (ulimit -f) or the file system",
        "raise the limit or write elsewhere",
    ),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EROFS: ("read-only file system", "give a writable --out"),
    errno.EACCES: ("permission denied", "make the folder writable or give another --out"),
    errno.EPERM: ("operation not permitted", "make the folder writable or give another --out"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "give a folder path"),
    errno.EIO: ("input/output error", "check the disk"),
}


class OutputWriteError(OSError):
    """A file of a run could not be written because of the environment (disk full, read-only,
    no permission ...). ``str()`` is one line naming the file, the cause and what to do; the
    original error is ``__cause__``, its number ``errno``, the file ``filename``."""

    def __init__(self, message: str, *, code: int | None = None, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.errno = code  # type: ignore[assignment]
        self.filename = path

    def __str__(self) -> str:
        return self.message


def find_os_error(exc: BaseException) -> OSError | None:
    """``exc`` itself when it is an ``OSError``, else the first ``OSError`` in its chain of
    causes and contexts (``torch.save`` hides a failed write in a ``RuntimeError``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def output_write_error(
    path: str | Path, error: OSError, action: str = "write", note: str = ""
) -> OutputWriteError:
    """The :class:`OutputWriteError` for ``error`` met while doing ``action`` on ``path``
    (``note`` is added in parentheses after what to do)."""
    if isinstance(error, OutputWriteError):
        return error
    code = error.errno
    cause, todo = _CAUSES.get(code or -1, ("", "check the folder"))
    name = errno.errorcode.get(code or -1, "")
    detail = error.strerror or str(error) or type(error).__name__
    why = f"{cause} ({name}: {detail})" if cause else (f"{name}: {detail}" if name else detail)
    return OutputWriteError(
        f"cannot {action} {str(path)!r}: {why}; {todo}{f' ({note})' if note else ''}",
        code=code,
        path=str(path),
    )


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
    temporary file is removed; an ``OSError`` (also one wrapped in another exception) is raised
    as :class:`OutputWriteError`. ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = temp_name(path)
    note = f"{path.name} is unchanged" if path.exists() else ""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise output_write_error(path, exc, note=note) from exc
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        found = find_os_error(exc) if isinstance(exc, Exception) else None
        if found is not None:
            raise output_write_error(path, found, note=note) from exc
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
