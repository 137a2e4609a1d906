"""Downloads checked against a published MD5 and renamed into place atomically (the shared
step of ``data.download`` for MNIST and CIFAR-10)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import DataError

__all__ = ["fetch_verified", "md5_file"]


def md5_file(path: Path) -> str:
    """Hex MD5 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _urlretrieve(url: str, dest: Path) -> None:
    urllib.request.urlretrieve(url, dest)  # noqa: S310 - fixed mirror URLs


def fetch_verified(
    urls: Sequence[str],
    dest: Path,
    md5: str,
    *,
    what: str,
    fetch: Callable[[str, Path], None] = _urlretrieve,
) -> None:
    """Download ``dest`` from the first of ``urls`` that serves a file with MD5 ``md5``.

    Each attempt goes to a temporary file of its own beside ``dest`` (concurrent callers never
    write the same file) and is renamed over ``dest`` only once checked: a reader sees no file
    or a complete one. Raises :class:`DataError` (one line, prefixed ``what``) naming every URL
    tried and what went wrong there; nothing is left behind. ``fetch(url, path)`` copies one
    URL into a file (``urllib.request.urlretrieve`` by default) and raises ``OSError``.
    """
    failures: list[str] = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                fetch(url, tmp)
            except OSError as exc:
                failures.append(f"{url}: {exc}")
                continue
            digest = md5_file(tmp)
            if digest != md5:
                failures.append(f"{url}: md5 {digest}, expected {md5} (interrupted or altered)")
                continue
            os.replace(tmp, dest)
            return
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(f"{what}: could not download {dest.name}: {'; '.join(failures)}")
