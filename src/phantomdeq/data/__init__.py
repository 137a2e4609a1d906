"""Data sets for training MDEQ models: digits, MNIST (IDX), CIFAR-10 (pickled batches) held in
memory as tensors, image folders (ImageNet layout) streamed from disk, batched tensor
augmentation and a batch loader.

``load_dataset(name, root, ...)`` returns ``(train, test, info)``: for digits, MNIST and CIFAR-10
``train``/``test`` are :class:`ImageTensorDataset` (``.images``/``.labels`` tensors), for image
folders :class:`~phantomdeq.data.imagefolder.ImageFolderDataset` (file names only, images decoded
per item); ``info`` is a :class:`DataInfo`. ``prepare_dataset`` does what must happen once
before loading (the CIFAR-10 download); :class:`BatchLoader` turns index batches into
model-ready ``(x, y)``. Character-level text for language models: :func:`load_text` and, for
the trainer, :func:`load_text_dataset` (:mod:`phantomdeq.data.text`). Every data problem raises :class:`DataError` (a ``ValueError``) with a
one-line message naming the file, folder or option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .base import DataInfo, ImageTensorDataset, check_mean_std, normalize_images
from .errors import DataError, DataFileNotFoundError
from .loader import BatchLoader, item_seed
from .text import (
    CharVocab,
    TextBatches,
    TextCorpus,
    TextInfo,
    TextWindows,
    load_text,
    load_text_dataset,
    sequential_batches,
)
from .transforms import augment_batch, random_crop, random_hflip

if TYPE_CHECKING:
    from .imagefolder import ImageFolderDataset

__all__ = [
    "DATASET_CHANNELS",
    "DATASET_NAMES",
    "DOWNLOADABLE",
    "BatchLoader",
    "CharVocab",
    "DataError",
    "DataFileNotFoundError",
    "DataInfo",
    "ImageFolderDataset",
    "ImageTensorDataset",
    "TextBatches",
    "TextCorpus",
    "TextInfo",
    "TextWindows",
    "augment_batch",
    "item_seed",
    "load_dataset",
    "load_text",
    "load_text_dataset",
    "normalize_images",
    "prepare_dataset",
    "random_crop",
    "random_hflip",
    "sequential_batches",
]

DATASET_NAMES = ("digits", "mnist", "cifar10", "imagefolder")
"""The names :func:`load_dataset` accepts."""
DATASET_CHANNELS = {"digits": 1, "mnist": 1, "cifar10": 3, "imagefolder": 3}
"""Image channels of each data set (one ``mean``/``std`` entry per channel)."""
DOWNLOADABLE = ("mnist", "cifar10")
"""The data sets :func:`prepare_dataset` can download (``download=True``)."""


def _imagefolder_module() -> Any:
    # needs Pillow (the ``train`` extra), so it is imported on first use
    try:
        from . import imagefolder
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"image folders need Pillow ({e}): pip install 'phantomdeq[train]'"
        ) from e
    return imagefolder


def __getattr__(name: str) -> Any:
    if name == "ImageFolderDataset":
        return _imagefolder_module().ImageFolderDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise DataError(f"load_dataset: unknown name {name!r}; allowed: {', '.join(DATASET_NAMES)}")


def _take(ds: Any, n: int | None, field: str, seed: int, name: str) -> Any:
    if n is None:
        return ds
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"load_dataset: {field} must be None or an int >= 1, got {n!r}")
    if n < 1:
        raise DataError(f"load_dataset: {field} must be None or an int >= 1, got {n!r}")
    if n > len(ds):
        split = "training" if field == "train_size" else "test"
        raise DataError(
            f"{field}={n} exceeds the {len(ds)} examples of the {name} {split} split; "
            f"use at most {len(ds)} (or null for all)"
        )
    if n == len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds.subset(perm[:n].sort().values)


def prepare_dataset(name: str, root: str | Path | None, *, download: bool = False) -> None:
    """Do what must happen once before :func:`load_dataset` reads a data set: with
    ``download=True``, fetch CIFAR-10 (and extract it) or the MNIST files into ``root`` when
    they are missing, each checked against its published MD5 (safe for concurrent callers, but
    a multi-process job should call it on one rank and let the others wait at a barrier).
    Nothing else is ever downloaded; for other data sets this is a no-op.

    Raises:
        DataError: unknown name, ``download`` for a set other than CIFAR-10 and MNIST, missing
            ``root``, a failed download.
    """
    _check_name(name)
    if not download:
        return
    if name not in DOWNLOADABLE:
        raise DataError(
            f"load_dataset: download=True is supported for {', '.join(map(repr, DOWNLOADABLE))} "
            f"only, not {name!r}"
        )
    if root is None:
        raise DataError(f"load_dataset: root (the data directory) is required for {name!r}")
    if name == "mnist":
        from .mnist_download import download_mnist

        download_mnist(root)
        return
    from .cifar10 import download_cifar10

    download_cifar10(root)


def load_dataset(
    name: str,
    root: str | Path | None,
    *,
    download: bool = False,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: bool = False,
    flip: bool = True,
) -> tuple[Any, Any, DataInfo]:
    """Load a data set by name.

    Args:
        name: ``"digits"`` (scikit-learn 8x8 digits, seeded 80/20 split; ``root`` ignored),
            ``"mnist"`` (IDX files in ``root``; t10k-only folders are split 8000/2000),
            ``"cifar10"`` (``root/cifar-10-batches-py``), ``"imagefolder"``
            (``root/train/<class>/``, ``root/val/<class>/``; streamed from disk).
        root: data directory (required except for digits).
        download: :func:`prepare_dataset` first (CIFAR-10 and MNIST).
        seed: seed of the deterministic splits and subsets.
        train_size: keep a seeded random subset of this many training examples.
        test_size: keep a seeded random subset of this many test examples.
        image_size: ``imagefolder`` output size (int or ``(height, width)``; default 224).
        mean: per-channel normalisation means replacing the data set's own (one entry per
            channel; give ``std`` too); ``None`` keeps them (digits: train-split statistics;
            MNIST, CIFAR-10: their standard constants; image folders: the ImageNet constants).
        std: per-channel standard deviations (> 0), with ``mean``.
        augment: ``imagefolder`` only: the train split's seeded items get the random resized
            crop; tensor data sets are augmented per batch by the caller
            (:func:`augment_batch`).
        flip: ``imagefolder`` only: the train transform adds the random horizontal flip.

    Raises:
        DataError: unknown name, bad option, malformed or missing files (one line naming them;
            missing files raise the subclass :class:`DataFileNotFoundError`).
    """
    _check_name(name)
    if image_size is not None and name != "imagefolder":
        raise DataError(f"load_dataset: image_size applies to 'imagefolder' only, not {name!r}")
    if augment and name != "imagefolder":
        raise DataError(
            f"load_dataset: augment applies to 'imagefolder' only, not {name!r} "
            f"(augment its batches with augment_batch)"
        )
    if (mean is None) != (std is None):
        raise DataError("load_dataset: give both mean and std, or neither")
    if mean is not None and std is not None:
        check_mean_std(mean, std, DATASET_CHANNELS[name], f"load_dataset({name!r})")
    prepare_dataset(name, root, download=download)
    if name != "digits" and root is None:
        raise DataError(f"load_dataset: root (the data directory) is required for {name!r}")
    train: Any
    test: Any
    if name == "digits":
        from .digits import load_digits_dataset

        train, test, info = load_digits_dataset(seed=seed)
    elif name == "mnist":
        from .mnist import load_mnist

        train, test, info = load_mnist(Path(str(root)), seed=seed)
    elif name == "cifar10":
        from .cifar10 import load_cifar10

        train, test, info = load_cifar10(Path(str(root)))
    else:
        train, test, info = _imagefolder_module().load_imagefolder(
            Path(str(root)), image_size=image_size, mean=mean, std=std, augment=augment, flip=flip
        )
    if mean is not None and std is not None and name != "imagefolder":
        train, test, info = _renormalized(train, test, info, mean, std)
    train = _take(train, train_size, "train_size", seed, name)
    test = _take(test, test_size, "test_size", seed + 1, name)
    return train, test, info


def _renormalized(
    train: ImageTensorDataset,
    test: ImageTensorDataset,
    info: DataInfo,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    train = train.with_normalization(mean, std)
    test = test.with_normalization(mean, std)
    info = replace(info, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    return train, test, info
