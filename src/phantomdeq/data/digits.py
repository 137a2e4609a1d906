"""scikit-learn's 8x8 handwritten digits (1797 images), split 80/20 deterministically."""

from __future__ import annotations

import torch

from .base import DataInfo, ImageTensorDataset

__all__ = ["load_digits_dataset"]


def load_digits_dataset(
    *, seed: int = 0, test_fraction: float = 0.2
) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Return (train, test, info) for sklearn's digits; pixels 0..16 are scaled to ``[0, 1]``.

    The split is a permutation drawn from ``torch.Generator().manual_seed(seed)``; the last
    ``round(test_fraction * 1797)`` permuted images form the test set.  Normalisation constants
    are computed on the training split.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_dataset('digits') needs scikit-learn: pip install 'phantomdeq[train]'"
        ) from e
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"load_digits_dataset: test_fraction must be in (0, 1), got {test_fraction}"
        )
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    n = images.shape[0]
    n_test = int(round(test_fraction * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: n - n_test], perm[n - n_test :]
    mean = float(images[tr].mean())
    std = float(images[tr].std())
    train = ImageTensorDataset(images[tr], labels[tr], (mean,), (std,))
    test = ImageTensorDataset(images[te], labels[te], (mean,), (std,))
    info = DataInfo(
        num_classes=10,
        in_channels=1,
        image_size=(8, 8),
        mean=(mean,),
        std=(std,),
        name="digits",
        classes=tuple(str(i) for i in range(10)),
    )
    return train, test, info
