"""CIFAR-10 from the standard python pickled batches (``cifar-10-batches-py``).

Two steps: :func:`download_cifar10` *prepares* the folder (download, md5 check, extraction; safe
for concurrent callers, e.g. every rank of a multi-process job) and :func:`load_cifar10` only
*reads* it. The batches are read through a restricted unpickler (:mod:`.safe_pickle`): a planted
batch that names any global other than numpy's array reconstruction is refused, not executed.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .base import DataInfo, ImageTensorDataset
from .errors import DataError, DataFileNotFoundError
from .fetch import fetch_verified, md5_file
from .safe_pickle import load_restricted

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "download_cifar10",
    "load_cifar10",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_ARCHIVE = "cifar-10-python.tar.gz"
_DIR = "cifar-10-batches-py"
_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = ("test_batch",)
_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _batch_dir(root: Path) -> Path:
    return root if root.name == _DIR or (root / "test_batch").is_file() else root / _DIR


def _missing(bdir: Path) -> list[str]:
    return [n for n in _TRAIN + _TEST if not (bdir / n).is_file()]


def _fetch(url: str, dest: Path) -> None:
    urllib.request.urlretrieve(url, dest)  # noqa: S310 - fixed https URL


def _fetch_archive(root: Path) -> Path:
    """``root/cifar-10-python.tar.gz`` with the right md5, downloaded if needed.

    The download goes to a temporary file of its own in ``root`` (so concurrent callers never
    write the same file), is md5-checked and then renamed over the archive atomically: a reader
    sees either no archive or a complete one.
    """
    archive = root / _ARCHIVE
    if not (archive.is_file() and md5_file(archive) == CIFAR10_MD5):
        fetch_verified([CIFAR10_URL], archive, CIFAR10_MD5, what="CIFAR-10", fetch=_fetch)
    return archive


def _extract(archive: Path, root: Path) -> Path:
    """Extract into a fresh temporary directory in ``root``, then rename the batch folder into
    place (atomic). If another caller got there first, only the files still missing are
    moved over (each rename is atomic), so nothing is ever read half-written."""
    target = root / _DIR
    staging = Path(tempfile.mkdtemp(prefix=".cifar-10-extract.", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, filter="data")
                else:  # pragma: no cover - Pythons without extraction filters
                    tar.extractall(staging)  # noqa: S202 - the archive passed the md5 check
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"CIFAR-10: cannot extract {archive}: {exc}") from exc
        extracted = staging / _DIR
        if _missing(extracted):
            raise DataError(
                f"CIFAR-10: {archive} does not hold {_DIR}/ with {', '.join(_missing(extracted))}"
            )
        try:
            os.rename(extracted, target)
        except OSError:  # the target exists (another caller, or a partial copy)
            target.mkdir(exist_ok=True)
            for name in _missing(target):
                os.replace(extracted / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download_cifar10(root: str | Path) -> Path:
    """Make ``root/cifar-10-batches-py`` complete and return it.

    Idempotent (nothing is fetched when the batches are present) and safe for concurrent
    callers: the archive is downloaded into a temporary file unique to the caller,
    md5-checked against :data:`CIFAR10_MD5` and renamed into place; it is extracted into a
    temporary directory renamed into place. A multi-process job should still call it on one
    rank first and let the others wait, so the 170 MB are fetched once.

    Raises:
        DataError: the download fails or its md5 differs, or the archive is malformed.
    """
    root = Path(root)
    bdir = _batch_dir(root)
    if not _missing(bdir):
        return bdir
    if root.name == _DIR:  # the batch folder itself was given
        root = root.parent
    root.mkdir(parents=True, exist_ok=True)
    return _extract(_fetch_archive(root), root)


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_restricted(path, "CIFAR-10 batch")
    if isinstance(d, dict):  # a batch re-pickled from Python 3 may have str keys
        d = {k.encode() if isinstance(k, str) else k: v for k, v in d.items()}
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DataError(f"CIFAR-10: {path} must hold a dict with keys b'data' and b'labels'")
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"CIFAR-10: {path}: b'data'/b'labels' are not numeric: {exc}") from exc
    if (
        data.ndim != 2
        or data.shape[1] != 3072
        or labels.ndim != 1
        or data.shape[0] != labels.shape[0]
    ):
        raise DataError(
            f"CIFAR-10: {path}: b'data' must be uint8 [N, 3072] with N = len(b'labels'), "
            f"got {data.shape} and {labels.shape[0] if labels.ndim else 0} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10: {path}: labels must be in 0..9")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels)


def load_cifar10(
    root: str | Path, *, download: bool = False
) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Load CIFAR-10 (50k/10k) from ``root`` or ``root/cifar-10-batches-py``.

    ``download=True`` first calls :func:`download_cifar10` (prepare, then read).

    Raises:
        DataFileNotFoundError: batch files are missing (the message names them and the URL).
        DataError: a batch is malformed or names a forbidden pickle global.
    """
    root = Path(root)
    bdir = download_cifar10(root) if download else _batch_dir(root)
    missing = _missing(bdir)
    if missing:
        raise DataFileNotFoundError(
            f"CIFAR-10: expected {', '.join(missing)} in {bdir}; get {CIFAR10_URL} and "
            f"extract it into {root} (or pass download=True / --set data.download=true)"
        )
    tr = [_read_batch(bdir / n) for n in _TRAIN]
    te = _read_batch(bdir / _TEST[0])
    xtr = torch.cat([t[0] for t in tr])
    ytr = torch.cat([t[1] for t in tr])
    info = DataInfo(
        num_classes=10,
        in_channels=3,
        image_size=(32, 32),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        name="cifar10",
        classes=_CLASSES,
    )
    return (
        ImageTensorDataset(xtr, ytr, CIFAR10_MEAN, CIFAR10_STD),
        ImageTensorDataset(te[0], te[1], CIFAR10_MEAN, CIFAR10_STD),
        info,
    )
