"""Batched data augmentation on tensors (any device), driven by an explicit generator.

The standard CIFAR-10 augmentation used by MDEQ and the paper's CIFAR experiments: random
crop after zero padding (4 pixels) and random horizontal flip, applied per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment_batch", "random_crop", "random_hflip"]


def _rand_on(
    x: Tensor, generator: torch.Generator | None, fn: str, *args: object, **kwargs: object
) -> Tensor:
    gen_device = generator.device if generator is not None else x.device
    out = getattr(torch, fn)(*args, generator=generator, device=gen_device, **kwargs)
    return out.to(x.device)


def _check_batch(x: Tensor, who: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{who}: expected a batch [B, C, H, W], got shape {tuple(x.shape)}")


def random_crop(
    x: Tensor, padding: int, *, generator: torch.Generator | None = None, fill: float = 0.0
) -> Tensor:
    """Pad each image by ``padding`` pixels (value ``fill``) and crop back to ``H x W`` at a
    random per-sample offset (``0 .. 2*padding`` in each direction)."""
    _check_batch(x, "random_crop")
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"random_crop: padding must be an int >= 0, got {padding!r}")
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), value=fill)
    oy = _rand_on(x, generator, "randint", 0, 2 * padding + 1, (b,))
    ox = _rand_on(x, generator, "randint", 0, 2 * padding + 1, (b,))
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bidx, cidx, rows, cols]


def random_hflip(x: Tensor, *, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image left-right with probability ``p``."""
    _check_batch(x, "random_hflip")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_hflip: p must be in [0, 1], got {p!r}")
    flip = _rand_on(x, generator, "rand", (x.shape[0],)) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_batch(
    x: Tensor,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    fill: float = 0.0,
) -> Tensor:
    """Random crop with ``crop_padding`` then (if ``flip``) random horizontal flip.

    Applied to normalised batches, the default ``fill=0`` pads with the per-channel data mean.
    """
    y = random_crop(x, crop_padding, generator=generator, fill=fill)
    if flip:
        y = random_hflip(y, generator=generator)
    return y
