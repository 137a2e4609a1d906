"""Per-image ImageNet transforms on Pillow images, driven by an explicit numpy generator.

The standard ImageNet recipe (as used by MDEQ's ImageNet runs):

* train: *random resized crop* -- a box covering a fraction ``s ~ U(0.08, 1)`` of the image area
  with aspect ratio ``r`` log-uniform in ``[3/4, 4/3]`` (10 tries, then the largest centred box
  with the ratio clamped to that range), resized to ``size`` -- then a horizontal flip with
  probability 1/2;
* eval: resize the shorter side to ``round(size * 256 / 224)`` (the longer side in proportion),
  then crop the centre ``size``.

Resizing is bilinear with Pillow's antialiasing (its filter support widens when shrinking).
Every random number comes from the ``numpy.random.Generator`` passed in, so a transform is a
pure function of the image and the generator's seed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = [
    "EVAL_RESIZE_RATIO",
    "center_crop_box",
    "eval_transform",
    "random_resized_crop_box",
    "train_transform",
]

EVAL_RESIZE_RATIO = 256 / 224
"""Shorter side before the centre crop, relative to the crop (ImageNet's 256 -> 224)."""

_SCALE = (0.08, 1.0)
_RATIO = (3 / 4, 4 / 3)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = _SCALE,
    ratio: tuple[float, float] = _RATIO,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a random box of area fraction ``~U(scale)`` and aspect ratio
    ``w/h`` log-uniform in ``ratio``; after ``attempts`` boxes that do not fit, the whole
    image cropped centrally to the nearest allowed aspect ratio."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * float(rng.uniform(scale[0], scale[1]))
        aspect = math.exp(float(rng.uniform(log_lo, log_hi)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, out_w: int, out_h: int) -> tuple[int, int]:
    """``(left, top)`` of the centred ``out_w x out_h`` box (``round`` of half the margin)."""
    return int(round((width - out_w) / 2.0)), int(round((height - out_h) / 2.0))


def train_transform(
    image: Image.Image, size: tuple[int, int], rng: np.random.Generator, *, flip: bool = True
) -> Image.Image:
    """Random resized crop to ``size = (height, width)``, then (if ``flip``) a horizontal flip
    with probability 1/2."""
    left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
    out = image.resize(
        (size[1], size[0]), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
    )
    if flip and float(rng.random()) < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def eval_transform(
    image: Image.Image, size: tuple[int, int], *, resize_ratio: float = EVAL_RESIZE_RATIO
) -> Image.Image:
    """Resize the shorter side to ``round(max(size) * resize_ratio)``, crop the centre
    ``size = (height, width)``."""
    short = int(round(max(size) * resize_ratio))
    w, h = image.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = center_crop_box(new_w, new_h, size[1], size[0])
    return image.crop((left, top, left + size[1], top + size[0]))
