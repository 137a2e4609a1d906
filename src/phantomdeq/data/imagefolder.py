"""Image folders ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet layout), streamed.

:class:`ImageFolderDataset` holds file names and labels only -- two numpy arrays, a few dozen
bytes per image, which forked ``DataLoader`` workers share without copying -- and reads, decodes
(Pillow, converted to RGB) and transforms one image per item. Nothing passes over the whole
set: normalisation uses configured constants (default: the ImageNet ones), so memory does not
depend on the number of images. Train items use the random resized crop + flip of
:mod:`.image_transforms` when the data set augments and the item comes with a seed; every other
item uses the deterministic eval transform (shorter side to ``size * 256/224``, centre crop).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .base import DataInfo, check_mean_std, normalize_images
from .errors import DataError, DataFileNotFoundError, one_line
from .image_transforms import eval_transform, train_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "load_imagefolder",
    "scan_split",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
_VAL_NAMES = ("val", "test")


def scan_split(
    split_dir: Path, classes: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """List ``split_dir/<class>/<image>``: relative file names (``bytes`` array), labels
    (``int64`` array) and class names (sorted folder names, or ``classes`` when given).

    Hidden entries (``.name``) and files without an image extension are skipped.

    Raises:
        DataError: a class folder holds no images, or (with ``classes``) a folder is not one of
            ``classes``.
        DataFileNotFoundError: the split has no class folders.
    """
    with os.scandir(split_dir) as it:
        found = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataFileNotFoundError(
            f"imagefolder: {split_dir} has no class folders; expected {split_dir}/<class>/<image>"
        )
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"imagefolder: {split_dir} has class folders {unknown} absent from the train split"
            )
    index = {c: i for i, c in enumerate(classes)}
    files: list[bytes] = []
    labels: list[int] = []
    for c in found:
        with os.scandir(split_dir / c) as it:
            names = sorted(
                e.name
                for e in it
                if not e.name.startswith(".")
                and e.is_file()
                and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            )
        if not names:
            raise DataError(
                f"imagefolder: class folder {split_dir / c} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        files.extend(os.fsencode(os.path.join(c, n)) for n in names)
        labels.extend([index[c]] * len(names))
    return np.array(files, dtype=np.bytes_), np.array(labels, dtype=np.int64), list(classes)


def _size_pair(image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if image_size is None:
        return (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return (image_size, image_size)
    if (
        isinstance(image_size, tuple | list)
        and len(image_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)
    ):
        return (int(image_size[0]), int(image_size[1]))
    raise DataError(
        f"load_imagefolder: image_size must be None, a positive int or (height, width), "
        f"got {image_size!r}"
    )


class ImageFolderDataset(Dataset[tuple[Tensor, Tensor]]):
    """Lazily decoded images of one split of an image folder.

    Args:
        root: the split directory (``.../train``).
        files: file names relative to ``root`` (``bytes`` array).
        labels: ``int64`` class indices, one per file.
        classes: class names (index = label).
        image_size: output ``(height, width)``.
        mean: per-channel normalisation means for ``[0, 1]`` images.
        std: per-channel normalisation standard deviations (> 0).
        augment: train items (those loaded with a seed) get the random resized crop.
        flip: the train transform includes the random horizontal flip.

    ``dataset[i]`` is ``(normalised float [3, H, W] image, label)`` with the eval transform;
    :meth:`load` is what batch loaders call (``uint8`` image, seed-driven train transform).
    """

    def __init__(
        self,
        root: str | Path,
        files: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        *,
        image_size: tuple[int, int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
        flip: bool = True,
    ) -> None:
        if files.ndim != 1 or labels.shape != files.shape:
            raise DataError(
                f"ImageFolderDataset: files and labels must be 1-d of equal length, "
                f"got {files.shape} and {labels.shape}"
            )
        check_mean_std(mean, std, 3, "ImageFolderDataset")
        self.root = Path(root)
        self.files = files
        self._labels = labels.astype(np.int64, copy=False)
        self.classes = tuple(classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = bool(augment)
        self.flip = bool(flip)

    def __len__(self) -> int:
        return int(self.files.shape[0])

    @property
    def labels(self) -> Tensor:
        """``[N]`` int64 labels (a view of the stored array)."""
        return torch.from_numpy(self._labels)

    def path(self, index: int) -> Path:
        """The file of item ``index``."""
        return self.root / os.fsdecode(bytes(self.files[index]))

    def load(self, index: int, seed: Sequence[int] | int | None = None) -> tuple[Tensor, int]:
        """Decode item ``index`` to a ``uint8 [3, H, W]`` tensor and its label.

        With ``seed`` (an int or a sequence of non-negative ints, e.g. ``(seed, epoch,
        index)``) and ``augment``, the train transform draws from
        ``numpy.random.default_rng(seed)``; otherwise the eval transform is used.

        Raises:
            DataError: the file is missing, truncated or not an image (the message names it).
        """
        path = self.path(index)
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except FileNotFoundError as exc:
            raise DataFileNotFoundError(f"imagefolder: {path} no longer exists") from exc
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"imagefolder: cannot decode {path}: {type(exc).__name__}: {one_line(exc)}"
            ) from exc
        if seed is not None and self.augment:
            rng = np.random.default_rng(seed)
            image = train_transform(image, self.image_size, rng, flip=self.flip)
        else:
            image = eval_transform(image, self.image_size)
        chw = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
        return torch.from_numpy(chw), int(self._labels[index])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.load(int(index))
        return self.normalize(x), torch.tensor(y)

    def normalize(self, images: Tensor) -> Tensor:
        """Map ``uint8`` images (``[..., 3, H, W]``, any device) to model inputs."""
        return normalize_images(images, self.mean, self.std)

    def subset(self, indices: Tensor) -> ImageFolderDataset:
        """A data set of the items ``indices`` (the name arrays are indexed, i.e. copied)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageFolderDataset(
            self.root,
            self.files[idx],
            self._labels[idx],
            self.classes,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            augment=self.augment,
            flip=self.flip,
        )


def load_imagefolder(
    root: str | Path,
    *,
    image_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: bool = False,
    flip: bool = True,
) -> tuple[ImageFolderDataset, ImageFolderDataset, DataInfo]:
    """Index ``root/train`` and ``root/val`` (or ``root/test``); class = sub-folder name.

    Args:
        image_size: output size, int or ``(height, width)``; default 224.
        mean, std: normalisation constants; default the ImageNet ones
            (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`).
        augment: the train split's seeded items get the random resized crop (+ ``flip``).

    Only the folders are listed; images are decoded when loaded.

    Raises:
        DataFileNotFoundError: ``train`` or ``val`` is missing or has no class folders.
        DataError: a class folder holds no images, or val has classes train lacks.
    """
    root = Path(root)
    size = _size_pair(image_size)
    mean = IMAGENET_MEAN if mean is None else tuple(mean)
    std = IMAGENET_STD if std is None else tuple(std)
    check_mean_std(mean, std, 3, "load_imagefolder")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataFileNotFoundError(
            f"imagefolder: expected a directory {train_dir} with one sub-folder of images per "
            f"class (and {root / 'val'} laid out the same way)"
        )
    val_dir = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
    if val_dir is None:
        raise DataFileNotFoundError(
            f"imagefolder: expected a directory {root / 'val'} (or {root / 'test'}) with one "
            f"sub-folder of images per class"
        )
    tr_files, tr_labels, classes = scan_split(train_dir)
    va_files, va_labels, _ = scan_split(val_dir, classes)
    common: dict[str, Any] = {"image_size": size, "mean": mean, "std": std, "flip": flip}
    train = ImageFolderDataset(train_dir, tr_files, tr_labels, classes, augment=augment, **common)
    val = ImageFolderDataset(val_dir, va_files, va_labels, classes, augment=False, **common)
    info = DataInfo(
        num_classes=len(classes),
        in_channels=3,
        image_size=size,
        mean=tuple(mean),
        std=tuple(std),
        name="imagefolder",
        classes=tuple(classes),
    )
    return train, val, info
