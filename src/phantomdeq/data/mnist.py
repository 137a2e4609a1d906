"""MNIST from the original IDX files (``train-*`` and/or ``t10k-*``, gzipped or not)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import DataInfo, ImageTensorDataset
from .errors import DataError, DataFileNotFoundError
from .fetch import md5_file

__all__ = ["MNIST_MEAN", "MNIST_STD", "load_mnist", "read_idx"]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
_URL = "https://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"
_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in ``.gz``) of unsigned bytes; check the
    magic number and that the payload holds exactly the bytes the header's dimensions need.

    Raises:
        DataError: the file is not gzip although named ``.gz``, is truncated or corrupt, or
            has the wrong magic number (the message names the file).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataFileNotFoundError(f"{path}: file not found") from exc
    except gzip.BadGzipFile as exc:
        raise DataError(
            f"{path}: not a gzip file ({exc}); gunzip-ed files must not end in .gz"
        ) from exc
    except (EOFError, zlib.error) as exc:
        raise DataError(
            f"{path}: truncated or corrupt gzip data ({exc}); download it again"
        ) from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if len(data) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims))
    if len(data) - header != count:
        state = "truncated" if len(data) - header < count else "too long"
        raise DataError(
            f"{path}: IDX payload {state}: {len(data) - header} bytes, dimensions {dims} "
            f"need {count}; download the file again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for d in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem + ".gz", stem):
            p = d / name
            if p.is_file():
                return p
    return None


def _check_md5(path: Path, root: Path) -> None:
    """When ``root/MD5SUMS`` (``md5sum`` format) lists ``path``'s name, check the file against it.

    Raises:
        DataError: the MD5 differs (the message names the file and both sums).
    """
    sums = root / "MD5SUMS"
    if not sums.is_file() or path.parent != root:
        return
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == path.name:
            digest = md5_file(path)
            if digest != parts[0].lower():
                raise DataError(
                    f"{path}: MD5 {digest} differs from {parts[0]} listed in {sums}; the file is "
                    f"damaged or not the canonical one, download it again from {_URL}"
                )
            return


def _load_split(root: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    img_stem = f"{prefix}-images-idx3-ubyte"
    lbl_stem = f"{prefix}-labels-idx1-ubyte"
    ip, lp = _find(root, img_stem), _find(root, lbl_stem)
    if ip is None and lp is None:
        return None
    if ip is None or lp is None:
        missing = img_stem if ip is None else lbl_stem
        raise DataFileNotFoundError(
            f"MNIST: found one of the {prefix} files but not {missing}(.gz) in {root}; "
            f"download it from {_URL}"
        )
    _check_md5(ip, root)
    _check_md5(lp, root)
    images = read_idx(ip, _IMAGES_MAGIC)
    labels = read_idx(lp, _LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST: {ip} has {images.shape[0]} images but {lp} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"MNIST: {lp} contains labels > 9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, H, W] uint8
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_mnist(
    root: str | Path, *, seed: int = 0, t10k_train_fraction: float = 0.8
) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Load MNIST from ``root``.

    With the ``train-*`` and ``t10k-*`` files present the standard 60k/10k split is used (the
    layout of ``../shared/data/mnist``, the configs' default).  A ``MD5SUMS`` file in ``root``
    (``md5sum`` format) is checked for the files it lists.  When only the ``t10k-*`` files exist
    (the older ``../shared/data/mnist-t10k`` layout), their images are split by a seeded permutation: the first
    ``round(t10k_train_fraction * N)`` permuted images train, the rest test (8000/2000 for the
    10k test set).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFileNotFoundError(
            f"MNIST: directory {root} does not exist; expected t10k-images-idx3-ubyte.gz and "
            f"t10k-labels-idx1-ubyte.gz (optionally train-*-ubyte.gz) there, from {_URL}"
        )
    train = _load_split(root, "train")
    test = _load_split(root, "t10k")
    if test is None:
        raise DataFileNotFoundError(
            f"MNIST: expected t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz) in "
            f"{root}; download them from {_URL}"
        )
    if train is None:
        x, y = test
        if not 0.0 < t10k_train_fraction < 1.0:
            raise ValueError(
                f"load_mnist: t10k_train_fraction must be in (0, 1), got {t10k_train_fraction}"
            )
        t10k_train = int(round(t10k_train_fraction * x.shape[0]))
        if not 0 < t10k_train < x.shape[0]:
            raise DataError(
                f"load_mnist: {x.shape[0]} t10k images are too few to split into train and test"
            )
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        train = (x[perm[:t10k_train]], y[perm[:t10k_train]])
        test = (x[perm[t10k_train:]], y[perm[t10k_train:]])
    h, w = train[0].shape[-2:]
    info = DataInfo(
        num_classes=10,
        in_channels=1,
        image_size=(int(h), int(w)),
        mean=MNIST_MEAN,
        std=MNIST_STD,
        name="mnist",
        classes=tuple(str(i) for i in range(10)),
    )
    return (
        ImageTensorDataset(train[0], train[1], MNIST_MEAN, MNIST_STD),
        ImageTensorDataset(test[0], test[1], MNIST_MEAN, MNIST_STD),
        info,
    )
