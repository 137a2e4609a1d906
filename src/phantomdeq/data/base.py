"""In-memory image datasets shared by the loaders (digits, MNIST, CIFAR-10, image folders)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DataError

__all__ = [
    "DataInfo",
    "ImageTensorDataset",
    "check_mean_std",
    "normalize_images",
]


def check_mean_std(mean: Sequence[float], std: Sequence[float], channels: int, who: str) -> None:
    """Raise :class:`DataError` (a ``ValueError``) unless ``mean``/``std`` have one finite entry per channel and every
    ``std`` entry is ``> 0`` (``TypeError`` for non-numbers)."""
    for name, values in (("mean", mean), ("std", std)):
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise TypeError(f"{who}: {name} must be a sequence of numbers, got {values!r}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{who}: {name} must be a sequence of numbers, got {values!r}")
        if len(values) != channels:
            raise DataError(
                f"{who}: {name} needs one entry per channel ({channels}), got {len(values)}: "
                f"{tuple(values)}"
            )
        if not all(math.isfinite(float(v)) for v in values):
            raise DataError(f"{who}: {name} entries must be finite, got {tuple(values)}")
    if any(float(s) <= 0 for s in std):
        raise DataError(f"{who}: std entries must be > 0, got {tuple(std)}")


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images01 - mean) / std`` per channel for ``uint8`` (0..255) or ``[0, 1]`` float images
    ``[..., C, H, W]`` on any device, as a new ``float32`` tensor (computed in place on one
    copy: the same rounding as the out-of-place formula, without three temporaries)."""
    x = images.to(torch.float32, copy=True)
    if images.dtype == torch.uint8:
        x.div_(255.0)
    x.sub_(torch.tensor(mean, device=x.device, dtype=x.dtype).view(-1, 1, 1))
    x.div_(torch.tensor(std, device=x.device, dtype=x.dtype).view(-1, 1, 1))
    return x


@dataclass(frozen=True)
class DataInfo:
    """What a model and trainer need to know about a data set.

    Attributes:
        num_classes: number of label classes (labels are ``0 .. num_classes-1``).
        in_channels: image channels (1 grayscale, 3 RGB).
        image_size: ``(height, width)`` of every image.
        mean, std: per-channel normalisation constants applied to images scaled to ``[0, 1]``.
        name: data set name.
        classes: class names (index = label), when known.
    """

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    classes: tuple[str, ...] = ()


class ImageTensorDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images and labels held as CPU tensors; items are ``(normalised float image, label)``.

    Args:
        images: ``[N, C, H, W]`` tensor, ``uint8`` (0..255) or floating point in ``[0, 1]``.
        labels: ``[N]`` integer tensor.
        mean: per-channel constants; an item is ``(image01 - mean) / std``.
        std: per-channel constants (> 0), as above.

    The raw tensors are exposed as :attr:`images` and :attr:`labels` for fast full-batch
    evaluation; use :meth:`normalize` on a batch (on any device) to get model inputs.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        if images.dim() != 4:
            raise ValueError(
                f"ImageTensorDataset: images must be [N, C, H, W], got {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
            raise ValueError(
                f"ImageTensorDataset: images must be uint8 or float, got {images.dtype}"
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"ImageTensorDataset: labels must be [N] with N={images.shape[0]}, got {tuple(labels.shape)}"
            )
        check_mean_std(mean, std, int(images.shape[1]), "ImageTensorDataset")
        self.images = images
        self.labels = labels.to(torch.long)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.normalize(self.images[index]), self.labels[index]

    def normalize(self, images: Tensor) -> Tensor:
        """Map raw images (``uint8`` or ``[0, 1]`` float, ``[..., C, H, W]``) to model inputs."""
        return normalize_images(images, self.mean, self.std)

    def subset(self, indices: Tensor) -> ImageTensorDataset:
        """A new dataset with the rows ``indices`` (tensors are indexed, i.e. copied)."""
        return ImageTensorDataset(self.images[indices], self.labels[indices], self.mean, self.std)

    def with_normalization(self, mean: Sequence[float], std: Sequence[float]) -> ImageTensorDataset:
        """The same tensors (shared, not copied) normalised with other constants."""
        return ImageTensorDataset(self.images, self.labels, mean, std)
