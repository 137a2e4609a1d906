"""Where a run's seeds are made: :func:`seed_of` mixes integers (a run's seed, the epoch, the
batch, the rank, ...) into a seed for a ``torch.Generator``, :func:`order_seed` is the seed of
an epoch's sample order, :func:`seed_everything` seeds the global generators of torch,
``random`` and NumPy."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["order_seed", "seed_everything", "seed_of"]


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixing integers (FNV-1a: stable across processes and Python versions)."""
    h = 1469598103934665603
    for p in parts:
        h ^= int(p) & 0xFFFFFFFFFFFFFFFF
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def order_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's global sample order (the mix the data order of every run so far
    was drawn with; changing it would change every recorded result)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**63)


def seed_everything(seed: int) -> None:
    """Seed the global torch, ``random`` and NumPy generators with ``seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
