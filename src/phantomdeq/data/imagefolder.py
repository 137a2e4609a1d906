"""Image folders ``root/train/<class>/*`` and ``root/val/<class>/*`` loaded into memory.

Meant for small folders (e.g. ImageNet subsets at reduced resolution): every image is decoded
with Pillow, converted to RGB, resized to ``image_size`` and kept as a ``uint8`` tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DataInfo, ImageTensorDataset

__all__ = ["IMAGE_EXTENSIONS", "load_imagefolder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
_VAL_NAMES = ("val", "test")


def _list(split_dir: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"imagefolder: {split_dir} has class folders {unknown} absent from the train split"
            )
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for c in found:
        for p in sorted((split_dir / c).iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
                labels.append(index[c])
    if not paths:
        raise FileNotFoundError(
            f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}/<class>/"
        )
    return paths, labels, classes


def _decode(paths: list[Path], size: tuple[int, int] | None) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_dataset('imagefolder') needs Pillow: pip install pillow") from e
    arrays: list[np.ndarray] = []
    for p in paths:
        with Image.open(p) as raw:
            im = raw.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(
                f"imagefolder: {p} is {arr.shape[1]}x{arr.shape[0]} but earlier images are "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; pass image_size to resize"
            )
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_imagefolder(
    root: str | Path, *, image_size: int | tuple[int, int] | None = None
) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Load ``root/train`` and ``root/val`` (or ``root/test``); class = sub-folder name.

    ``image_size`` (int or ``(height, width)``) resizes every image; with None all images must
    share one size.  Normalisation constants are the per-channel mean/std of the train split.
    """
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"imagefolder: expected a directory {train_dir} with one sub-folder of images per "
            f"class (and {root / 'val'} laid out the same way)"
        )
    val_dir = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
    if val_dir is None:
        raise FileNotFoundError(
            f"imagefolder: expected a directory {root / 'val'} (or {root / 'test'}) with one "
            f"sub-folder of images per class"
        )
    size: tuple[int, int] | None
    if image_size is None:
        size = None
    elif isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        size = (image_size, image_size)
    elif (
        isinstance(image_size, tuple)
        and len(image_size) == 2
        and all(isinstance(s, int) and s > 0 for s in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(
            f"load_imagefolder: image_size must be None, a positive int or (height, width), "
            f"got {image_size!r}"
        )
    tr_paths, tr_labels, classes = _list(train_dir, None)
    va_paths, va_labels, _ = _list(val_dir, classes)
    xtr = _decode(tr_paths, size)
    xva = _decode(va_paths, size)
    if xtr.shape[1:] != xva.shape[1:]:
        raise ValueError(
            f"imagefolder: train images are {tuple(xtr.shape[2:])} but val images are "
            f"{tuple(xva.shape[2:])}; pass image_size to resize"
        )
    f = xtr.float() / 255.0
    mean = tuple(float(m) for m in f.mean(dim=(0, 2, 3)))
    std = tuple(max(float(s), 1e-3) for s in f.std(dim=(0, 2, 3)))
    info = DataInfo(
        num_classes=len(classes),
        in_channels=3,
        image_size=(int(xtr.shape[2]), int(xtr.shape[3])),
        mean=mean,
        std=std,
        name="imagefolder",
        classes=tuple(classes),
    )
    return (
        ImageTensorDataset(xtr, torch.tensor(tr_labels), mean, std),
        ImageTensorDataset(xva, torch.tensor(va_labels), mean, std),
        info,
    )
