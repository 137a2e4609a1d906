"""Deterministic batches for training and evaluation, plus the per-step seeds and augmentation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .config import Config

__all__ = ["Batches", "augment", "seed_of"]


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixing integers (stable across processes and Python versions)."""
    h = 1469598103934665603
    for p in parts:
        h ^= int(p) & 0xFFFFFFFFFFFFFFFF
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def augment(x: Tensor, cfg: Config, generator: torch.Generator) -> Tensor:
    """Batched random crop (zero padding of the normalised batch = mean padding) and flip."""
    from phantomdeq.data.transforms import augment_batch

    return augment_batch(
        x, crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, generator=generator
    )


class Batches:
    """Deterministic batches from a data set: a fast path for in-memory ``images``/``labels``
    tensors, a ``DataLoader`` over explicit index lists otherwise."""

    def __init__(self, dataset: Any, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        images = getattr(dataset, "images", None)
        labels = getattr(dataset, "labels", None)
        self.tensors = isinstance(images, Tensor) and isinstance(labels, Tensor)
        self.images: Tensor | None = images if self.tensors else None
        self.labels: Tensor | None = labels if self.tensors else None

    def __len__(self) -> int:
        return len(self.dataset)

    def iterate(
        self,
        batches: list[Tensor],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        *,
        seed: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield model-ready ``(x, y)`` on ``device`` (``x`` in ``dtype``) for each index batch.

        The ``DataLoader`` path draws its workers' base seed from a generator seeded with
        ``seed``, never from the global torch RNG (which the training loop checkpoints and
        restores: a loader created when a run resumes mid-epoch must not shift it)."""
        if self.tensors and self.images is not None and self.labels is not None:
            normalize = getattr(self.dataset, "normalize", None)
            for idx in batches:
                x = self.images[idx].to(device, non_blocking=True)
                y = self.labels[idx].to(device, non_blocking=True)
                x = normalize(x) if callable(normalize) else x
                yield x.to(dtype), y
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.dataset,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
        for x, y in loader:
            x = x.to(device, non_blocking=True).to(dtype)
            yield x, torch.as_tensor(y).to(device, non_blocking=True)
