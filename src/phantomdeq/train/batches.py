"""Deterministic batches for training and evaluation, plus the per-step seeds and augmentation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from phantomdeq.data import BatchLoader, augment_batch

from .config import Config
from .seeds import seed_of

__all__ = ["Batches", "augment", "seed_of"]


def augment(x: Tensor, cfg: Config, generator: torch.Generator) -> Tensor:
    """Batched random crop (zero padding of the normalised batch = mean padding) and flip of
    the in-memory data sets. Image folders are returned unchanged: their ``data.augment`` is
    the per-image random resized crop + flip applied by the loader (:class:`Batches`)."""
    if cfg.data.name == "imagefolder":
        return x
    return augment_batch(
        x, crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, generator=generator
    )


class Batches:
    """Deterministic batches of a data set for explicit index lists, through
    :class:`phantomdeq.data.BatchLoader`: in-memory ``images``/``labels`` tensors are sliced
    (no worker processes); streamed data sets (image folders) are decoded and transformed in
    ``num_workers`` persistent ``DataLoader`` workers (pinned memory on CUDA).

    Training passes give :meth:`iterate` the ``epoch`` and the run's ``seed``: each streamed
    item is then transformed with the seed ``(seed, epoch, index)``, so an epoch's pixels do
    not depend on ``num_workers`` or on where a resumed run starts. A data error in a worker
    (a truncated image) reaches the caller as a one-line :class:`phantomdeq.data.DataError`.
    """

    def __init__(self, dataset: Any, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.loader = BatchLoader(dataset, num_workers=num_workers)

    def __len__(self) -> int:
        return len(self.dataset)

    def iterate(
        self,
        batches: list[Tensor],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        *,
        epoch: int | None = None,
        seed: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield model-ready ``(x, y)`` on ``device`` (``x`` in ``dtype``) for each index batch;
        ``epoch``/``seed`` turn on the seeded per-item train transform of streamed data."""
        return self.loader.iterate(batches, device, dtype, epoch=epoch, seed=seed)

    def close(self) -> None:
        """Stop the loader's worker processes (restarted on the next pass)."""
        self.loader.close()
