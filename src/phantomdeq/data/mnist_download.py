"""Fetching the MNIST IDX files (``data.download: true``), checked against the published MD5s.

The four gzipped files are fetched from the first mirror that serves them with the right MD5,
each into a temporary file of its own in ``root`` renamed into place once checked (a reader
sees no file or a complete one; concurrent callers never write the same file). Files already in
``root`` (gzipped or not, also under ``MNIST/raw`` or ``raw``) are kept as they are and not
fetched again; :func:`~phantomdeq.data.mnist.read_idx` checks their structure when read.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from .errors import DataError
from .fetch import fetch_verified


def _fetch(url: str, dest: Path) -> None:
    """Copy ``url`` (``https://``, ``file://`` ...) into ``dest``; raises ``OSError``."""
    urllib.request.urlretrieve(url, dest)  # noqa: S310 - fixed mirror URLs


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


def _present(root: Path, name: str) -> bool:
    stem = name.removesuffix(".gz")
    return any(
        (d / n).is_file()
        for d in (root, root / "MNIST" / "raw", root / "raw")
        for n in (name, stem)
    )


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
            urls_for = [base.rstrip("/") + "/" + name for base in urls]
            fetch_verified(urls_for, root / name, md5, what="MNIST", fetch=_fetch)
    return root
