"""Fetching the MNIST IDX files (``data.download: true``), checked against the published MD5s.

The four gzipped files are fetched from the first mirror that serves them with the right MD5,
each into a temporary file of its own in ``root`` renamed into place once checked (a reader
sees no file or a complete one; concurrent callers never write the same file). Files already in
``root`` (gzipped or not, also under ``MNIST/raw`` or ``raw``) are kept as they are and not
fetched again; :func:`~phantomdeq.data.mnist.read_idx` checks their structure when read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from .errors import DataError

__all__ = ["MNIST_FILES", "MNIST_MIRRORS", "download_mnist"]

#: file name -> MD5 of the published gzipped file
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

#: base URLs tried in order
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path) -> None:
    """Copy ``url`` (``https://``, ``file://`` ...) into ``dest``; raises ``OSError``."""
    urllib.request.urlretrieve(url, dest)  # noqa: S310 - fixed mirror URLs


def _present(root: Path, name: str) -> bool:
    stem = name.removesuffix(".gz")
    return any(
        (d / n).is_file()
        for d in (root, root / "MNIST" / "raw", root / "raw")
        for n in (name, stem)
    )


def _fetch_checked(root: Path, name: str, md5: str, mirrors: tuple[str, ...]) -> None:
    failures: list[str] = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=root)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                _fetch(url, tmp)
            except OSError as exc:
                failures.append(f"{url}: {exc}")
                continue
            digest = _md5(tmp)
            if digest != md5:
                failures.append(f"{url}: md5 {digest}, expected {md5}")
                continue
            os.replace(tmp, root / name)
            return
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(f"MNIST: could not download {name}: {'; '.join(failures)}")


def download_mnist(root: str | Path, *, mirrors: tuple[str, ...] | None = None) -> Path:
    """Make ``root`` hold the four MNIST files and return it; fetch only the missing ones.

    Each download is checked against :data:`MNIST_FILES` (the published MD5s); ``mirrors``
    (default :data:`MNIST_MIRRORS`) are tried in order.

    Raises:
        DataError: no mirror served a file with the right MD5 (the message names the file, each
            URL tried and what went wrong there).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"MNIST: {root} is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    urls = MNIST_MIRRORS if mirrors is None else tuple(mirrors)
    if not urls:
        raise DataError("MNIST: no mirror to download from")
    for name, md5 in MNIST_FILES.items():
        if not _present(root, name):
            _fetch_checked(root, name, md5, urls)
    return root
