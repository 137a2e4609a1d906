"""Real data sets for training MDEQ models: digits, MNIST (IDX), CIFAR-10 (pickled batches)
and image folders, held in memory as tensors, plus batched tensor augmentation.

``load_dataset(name, root, ...)`` returns ``(train, test, info)`` where ``train``/``test`` are
:class:`ImageTensorDataset` (``torch.utils.data.Dataset`` subclasses exposing ``.images`` and
``.labels``) and ``info`` is a :class:`DataInfo`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import DataInfo, ImageTensorDataset
from .transforms import augment_batch, random_crop, random_hflip

__all__ = [
    "DATASET_NAMES",
    "DataInfo",
    "ImageTensorDataset",
    "augment_batch",
    "load_dataset",
    "random_crop",
    "random_hflip",
]

DATASET_NAMES = ("digits", "mnist", "cifar10", "imagefolder")


def _take(ds: ImageTensorDataset, n: int | None, field: str, seed: int) -> ImageTensorDataset:
    if n is None:
        return ds
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"load_dataset: {field} must be None or an int >= 1, got {n!r}")
    if n > len(ds):
        raise ValueError(f"load_dataset: {field}={n} exceeds the {len(ds)} examples available")
    if n == len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds.subset(perm[:n].sort().values)


def load_dataset(
    name: str,
    root: str | Path | None,
    *,
    download: bool = False,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Load a data set by name.

    Args:
        name: ``"digits"`` (scikit-learn 8x8 digits, seeded 80/20 split; ``root`` ignored),
            ``"mnist"`` (IDX files in ``root``; t10k-only folders are split 8000/2000),
            ``"cifar10"`` (``root/cifar-10-batches-py``), ``"imagefolder"``
            (``root/train/<class>/``, ``root/val/<class>/``).
        root: data directory (required except for digits).
        download: fetch CIFAR-10 when missing (other sets are never downloaded).
        seed: seed of the deterministic splits and subsets.
        train_size / test_size: keep a seeded random subset of this many examples.
        image_size: resize for ``imagefolder`` (int or ``(height, width)``).

    Raises:
        ValueError: unknown name / bad option / malformed files.
        FileNotFoundError: missing files (the message names the expected file and its source).
    """
    if name not in DATASET_NAMES:
        raise ValueError(
            f"load_dataset: unknown name {name!r}; allowed: {', '.join(DATASET_NAMES)}"
        )
    if image_size is not None and name != "imagefolder":
        raise ValueError(f"load_dataset: image_size applies to 'imagefolder' only, not {name!r}")
    if download and name != "cifar10":
        raise ValueError(
            f"load_dataset: download=True is supported for 'cifar10' only, not {name!r}"
        )
    if name == "digits":
        from .digits import load_digits_dataset

        train, test, info = load_digits_dataset(seed=seed)
    else:
        if root is None:
            raise ValueError(f"load_dataset: root (the data directory) is required for {name!r}")
        if name == "mnist":
            from .mnist import load_mnist

            train, test, info = load_mnist(root, seed=seed)
        elif name == "cifar10":
            from .cifar10 import load_cifar10

            train, test, info = load_cifar10(root, download=download)
        else:
            from .imagefolder import load_imagefolder

            train, test, info = load_imagefolder(root, image_size=image_size)
    train = _take(train, train_size, "train_size", seed)
    test = _take(test, test_size, "test_size", seed + 1)
    return train, test, info
