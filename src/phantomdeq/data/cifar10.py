"""CIFAR-10 from the standard python pickled batches (``cifar-10-batches-py``)."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .base import DataInfo, ImageTensorDataset

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_URL", "download_cifar10", "load_cifar10"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_DIR = "cifar-10-batches-py"
_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = ("test_batch",)
_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _batch_dir(root: Path) -> Path:
    return root if root.name == _DIR or (root / "test_batch").is_file() else root / _DIR


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar10(root: str | Path) -> Path:
    """Download and extract CIFAR-10 into ``root`` (md5-checked); return the batch directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    if not archive.is_file() or _md5(archive) != CIFAR10_MD5:
        tmp = archive.with_suffix(".part")
        urllib.request.urlretrieve(CIFAR10_URL, tmp)  # noqa: S310 - fixed https URL
        tmp.replace(archive)
    digest = _md5(archive)
    if digest != CIFAR10_MD5:
        raise ValueError(f"CIFAR-10: {archive} has md5 {digest}, expected {CIFAR10_MD5}")
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - old Pythons without extraction filters
            tar.extractall(root)  # noqa: S202 - archive checked by md5
    return root / _DIR


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    # The batches are pickled dicts by design of the data set; only load files you trust.
    with open(path, "rb") as fh:
        try:
            d = pickle.load(fh, encoding="bytes")
        except Exception as e:
            raise ValueError(f"CIFAR-10: {path} is not a readable pickled batch: {e}") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"CIFAR-10: {path} must be a dict with keys b'data' and b'labels'")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"CIFAR-10: {path}: b'data' must be uint8 [N, 3072] with N = len(b'labels'), "
            f"got {data.shape} and {labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10: {path}: labels must be in 0..9")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels)


def load_cifar10(
    root: str | Path, *, download: bool = False
) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Load CIFAR-10 (50k/10k) from ``root`` or ``root/cifar-10-batches-py``."""
    root = Path(root)
    bdir = _batch_dir(root)
    names = _TRAIN + _TEST
    missing = [n for n in names if not (bdir / n).is_file()]
    if missing and download:
        bdir = download_cifar10(root)
        missing = [n for n in names if not (bdir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10: expected {', '.join(missing)} in {bdir}; get {CIFAR10_URL} and "
            f"extract it into {root} (or pass download=True / --download)"
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
