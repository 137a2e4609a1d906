"""Data loaders against files written in the real on-disk formats, and batch augmentation."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from phantomdeq.data import (
    DataError,
    DataFileNotFoundError,
    ImageTensorDataset,
    augment_batch,
    load_dataset,
    random_crop,
    random_hflip,
)

REAL_MNIST = Path("/work/shared/data/mnist-t10k")
REAL_MNIST_FULL = Path("/work/shared/data/mnist")
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- writers


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    magic = 0x00000800 | arr.ndim  # 0x08 = unsigned byte
    payload = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _mnist_like(
    root: Path, prefix: str, n: int, seed: int, gz: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    _write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return images, labels


def _cifar_like(root: Path, n_per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    bdir = root / "cifar-10-batches-py"
    bdir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(bdir / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, fh)
        out[name] = (data, labels)
    return out


# ----------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_round_trip_train_and_test(tmp_path: Path, gz: bool) -> None:
    xtr, ytr = _mnist_like(tmp_path, "train", 12, 0, gz)
    xte, yte = _mnist_like(tmp_path, "t10k", 5, 1, gz)
    train, test, info = load_dataset("mnist", str(tmp_path))
    assert (len(train), len(test)) == (12, 5)
    assert train.images.dtype == torch.uint8 and train.images.shape == (12, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), xtr)
    assert np.array_equal(test.labels.numpy(), yte.astype(np.int64))
    assert info.num_classes == 10 and info.in_channels == 1 and info.image_size == (28, 28)
    img, lab = train[3]
    expected = (torch.from_numpy(xtr[3]).float() / 255 - info.mean[0]) / info.std[0]
    assert torch.allclose(img[0], expected) and int(lab) == int(ytr[3])


def test_mnist_t10k_only_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    images, _ = _mnist_like(tmp_path, "t10k", 50, 2)
    a_tr, a_te, _ = load_dataset("mnist", tmp_path, seed=3)
    b_tr, _, _ = load_dataset("mnist", tmp_path, seed=3)
    c_tr, _, _ = load_dataset("mnist", tmp_path, seed=4)
    assert (len(a_tr), len(a_te)) == (40, 10)
    assert torch.equal(a_tr.images, b_tr.images)
    assert not torch.equal(a_tr.images, c_tr.images)
    # together the two splits are exactly the 50 written images
    rows = {bytes(r) for r in images.reshape(50, -1)}
    got = [bytes(r) for r in torch.cat([a_tr.images, a_te.images]).reshape(50, -1).numpy()]
    assert set(got) == rows and len(got) == 50


def test_mnist_bad_magic_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)
    _mnist_like(tmp_path, "t10k", 10, 0)
    labels = np.zeros(10, dtype=np.uint8)
    payload = struct.pack(">II", 0x00000803, 10) + labels.tobytes()  # images magic on labels
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(payload)
    with pytest.raises(ValueError, match="magic"):
        load_dataset("mnist", tmp_path)


def _assert_one_line_naming(exc: BaseException, path: Path) -> None:
    msg = str(exc)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg


def test_mnist_truncated_or_non_gzip_files_are_data_errors_naming_the_file(
    tmp_path: Path,
) -> None:
    _mnist_like(tmp_path, "t10k", 10, 0)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    good = images.read_bytes()
    # a gzip stream cut short (an interrupted download): gzip raises EOFError, no file name
    images.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated") as err:
        load_dataset("mnist", tmp_path)
    _assert_one_line_naming(err.value, images)
    # an uncompressed file named .gz: gzip raises BadGzipFile, no file name
    images.write_bytes(b"\x00\x00\x08\x03" + bytes(200))
    with pytest.raises(DataError, match="not a gzip file") as err:
        load_dataset("mnist", tmp_path)
    _assert_one_line_naming(err.value, images)
    # a complete gzip stream of a truncated IDX payload
    with gzip.open(images, "wb") as fh:
        fh.write(gzip.decompress(good)[:-7])
    with pytest.raises(DataError, match="truncated") as err:
        load_dataset("mnist", tmp_path)
    _assert_one_line_naming(err.value, images)


def test_train_size_larger_than_the_set_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"train_size=100000 exceeds the 1438 examples") as err:
        load_dataset("digits", None, train_size=100000)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="test_size"):
        load_dataset("digits", None, test_size=360)


def test_missing_directories_are_data_errors(tmp_path: Path) -> None:
    for name in ("mnist", "cifar10", "imagefolder"):
        with pytest.raises(DataFileNotFoundError) as err:
            load_dataset(name, tmp_path / "nowhere")
        assert isinstance(err.value, DataError) and isinstance(err.value, FileNotFoundError)
        _assert_one_line_naming(err.value, tmp_path / "nowhere")


def test_configured_mean_std_replace_the_defaults() -> None:
    train, test, info = load_dataset("digits", None, mean=(0.25,), std=(0.5,))
    assert info.mean == (0.25,) and info.std == (0.5,)
    x, _ = test[0]
    assert torch.allclose(x, (test.images[0] - 0.25) / 0.5)
    with pytest.raises(DataError, match="one entry per channel"):
        load_dataset("digits", None, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="both mean and std"):
        load_dataset("digits", None, mean=(0.1,))


def _md5sums(root: Path) -> None:
    import hashlib

    lines = [
        f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(root.glob("*.gz"))
    ]
    (root / "MD5SUMS").write_text("\n".join(lines) + "\n")


def test_mnist_md5sums_are_checked(tmp_path: Path) -> None:
    _mnist_like(tmp_path, "train", 12, 0)
    _mnist_like(tmp_path, "t10k", 5, 1)
    _md5sums(tmp_path)
    train, test, _ = load_dataset("mnist", tmp_path)  # every listed sum matches
    assert (len(train), len(test)) == (12, 5)
    # a file replaced by another valid IDX file (other images) no longer matches its sum
    _mnist_like(tmp_path, "train", 12, 7)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: MD5 .*MD5SUMS"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("layout", ["standard", "t10k-only"])
def test_mnist_configs_default_to_the_standard_split_and_t10k_still_works(
    tmp_path: Path, layout: str
) -> None:
    # The shipped MNIST configs name ../shared/data/mnist (train + t10k files, 60k/10k); a user
    # who has only the t10k files points data.root at them and gets the seeded 80/20 split.
    from phantomdeq.train.config import load_config
    from phantomdeq.train.data import load_data

    for name in ("configs/mdeq_tiny_mnist.yaml", "configs/ablation/mnist_upg.yaml"):
        text = (REPO / name).read_text()
        assert "root: ../shared/data/mnist\n" in text, name
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    if layout == "standard":
        _mnist_like(data, "train", 30, 0)
    _mnist_like(data, "t10k", 20, 1)
    cfg = load_config(
        REPO / "configs" / "mdeq_tiny_mnist.yaml",
        [f"data.root={data}", "data.train_size=null", "data.test_size=null"],
    )
    train, test, info = load_data(cfg)
    expected = (30, 20) if layout == "standard" else (16, 4)
    assert (len(train), len(test)) == expected and info.image_size == (28, 28)


@pytest.mark.skipif(not REAL_MNIST_FULL.is_dir(), reason="standard MNIST files not present")
def test_real_mnist_standard_split() -> None:
    train, test, _ = load_dataset("mnist", REAL_MNIST_FULL)  # MD5SUMS checked on the way
    assert (len(train), len(test)) == (60000, 10000)
    assert set(test.labels.unique().tolist()) == set(range(10))


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="real MNIST t10k files not present")
def test_real_mnist_t10k_split() -> None:
    train, test, info = load_dataset("mnist", REAL_MNIST)
    assert (len(train), len(test)) == (8000, 2000)
    assert train.images.shape == (8000, 1, 28, 28) and info.image_size == (28, 28)
    assert set(train.labels.unique().tolist()) == set(range(10))
    # MNIST pixel statistics: mean ~0.13, std ~0.31 in [0, 1] units
    x = train.images.float() / 255
    assert 0.11 < float(x.mean()) < 0.15 and 0.28 < float(x.std()) < 0.34


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar10_pickled_batches_round_trip(tmp_path: Path) -> None:
    written = _cifar_like(tmp_path)
    train, test, info = load_dataset("cifar10", tmp_path)
    assert (len(train), len(test)) == (20, 4)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    data, labels = written["data_batch_2"]
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    assert int(train.images[4, 1, 2, 5]) == int(data[0, 1024 + 32 * 2 + 5])
    assert int(train.images[4, 2, 31, 0]) == int(data[0, 2048 + 32 * 31])
    assert train.labels[4:8].tolist() == labels
    assert test.labels.tolist() == written["test_batch"][1]
    assert info.num_classes == 10 and info.in_channels == 3 and len(info.mean) == 3
    # passing the batch directory itself works too
    t2, _, _ = load_dataset("cifar10", tmp_path / "cifar-10-batches-py")
    assert torch.equal(t2.images, train.images)


def test_cifar10_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)
    _cifar_like(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", tmp_path)


# ----------------------------------------------------------------------------- image folder


def _image_folder(root: Path, size: tuple[int, int] = (6, 5)) -> dict[str, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("cat", "ant"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
                arrays[f"{split}/{cls}/{i}"] = arr
    return arrays


def test_imagefolder_items_are_the_centre_crop(tmp_path: Path) -> None:
    arrays = _image_folder(tmp_path)
    train, val, info = load_dataset("imagefolder", tmp_path, image_size=4)
    assert info.classes == ("ant", "cat") and info.num_classes == 2
    assert (len(train), len(val)) == (6, 2) and info.image_size == (4, 4)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    # eval transform of a 5 (wide) x 6 (high) image to 4: the shorter side would be resized to
    # round(4 * 256 / 224) = 5 (it is already 5), then the centre 4x4 crop starts at
    # left = round(0.5) = 0, top = round(1.0) = 1. Sorted classes, sorted files: train[3] is
    # cat/0.png, label 1.
    x, y = train.load(3)
    assert x.dtype == torch.uint8 and x.shape == (3, 4, 4) and y == 1
    assert np.array_equal(x.permute(1, 2, 0).numpy(), arrays["train/cat/0"][1:5, 0:4])
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and val.labels.tolist() == [0, 1]
    img, lab = val[0]
    crop = torch.from_numpy(arrays["val/ant/0"][1:5, 0:4]).permute(2, 0, 1).float() / 255
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    assert torch.allclose(img, (crop - mean) / std, atol=1e-6) and int(lab) == 0


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match="train"):
        load_dataset("imagefolder", tmp_path)
    _image_folder(tmp_path)
    with pytest.raises(DataError, match="image_size"):
        load_dataset("imagefolder", tmp_path, image_size=0)
    with pytest.raises(DataError, match="std"):
        load_dataset("imagefolder", tmp_path, mean=(0.5, 0.5, 0.5), std=(0.2, 0.0, 0.2))
    with pytest.raises(DataError, match="one entry per channel"):
        load_dataset("imagefolder", tmp_path, mean=(0.5,), std=(0.2,))


def test_imagefolder_empty_class_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    empty = tmp_path / "train" / "zebra"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", tmp_path)
    assert str(empty) in str(err.value) and "\n" not in str(err.value)


def test_imagefolder_hidden_folders_are_not_classes(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    hidden = tmp_path / "train" / ".ipynb_checkpoints"
    hidden.mkdir()
    _, _, info = load_dataset("imagefolder", tmp_path)
    assert info.classes == ("ant", "cat")


# ----------------------------------------------------------------------------- digits & options


def test_digits_split_and_scaling() -> None:
    train, test, info = load_dataset("digits", None, seed=0)
    assert (len(train), len(test)) == (1438, 359)
    assert train.images.shape == (1438, 1, 8, 8) and info.image_size == (8, 8)
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0
    # the normalised training images have zero mean and unit std
    x = train.normalize(train.images)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    again, _, _ = load_dataset("digits", None, seed=0)
    other, _, _ = load_dataset("digits", None, seed=1)
    assert torch.equal(again.images, train.images) and not torch.equal(other.images, train.images)


def test_subsets_and_option_validation(tmp_path: Path) -> None:
    train, test, _ = load_dataset("digits", None, train_size=100, test_size=50)
    assert (len(train), len(test)) == (100, 50)
    with pytest.raises(ValueError, match="train_size"):
        load_dataset("digits", None, train_size=5000)
    with pytest.raises(ValueError, match="digits, mnist, cifar10, imagefolder"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10", None)


def test_dataset_through_a_dataloader() -> None:
    images = torch.arange(10 * 2 * 2, dtype=torch.uint8).view(10, 1, 2, 2)
    ds = ImageTensorDataset(images, torch.arange(10), (0.0,), (1.0,))
    x, y = next(iter(DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.allclose(x, images[:4].float() / 255)


# ----------------------------------------------------------------------------- transforms


def test_random_crop_is_a_window_of_the_padded_image() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 5, 6)
    pad = 2
    out = random_crop(x, pad, generator=g)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    offsets = set()
    for b in range(16):
        hits = [
            (oy, ox)
            for oy in range(2 * pad + 1)
            for ox in range(2 * pad + 1)
            if torch.equal(out[b], padded[b, :, oy : oy + 5, ox : ox + 6])
        ]
        assert hits, f"sample {b} is not a crop of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 1  # offsets vary per sample
    same = random_crop(x, pad, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, same)


def test_random_hflip_and_augment() -> None:
    x = torch.randn(32, 2, 4, 4)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, p=0.0), x)
    y = random_hflip(x, generator=torch.Generator().manual_seed(1))
    flipped = [torch.equal(y[b], x[b].flip(-1)) for b in range(32)]
    assert all(f or torch.equal(y[b], x[b]) for b, f in enumerate(flipped))
    assert 0 < sum(flipped) < 32
    z = augment_batch(x, crop_padding=1, generator=torch.Generator().manual_seed(2))
    assert z.shape == x.shape
    with pytest.raises(ValueError, match="padding"):
        random_crop(x, -1)


# ----------------------------------------------------------------------------- config


def test_data_config_mean_std_validation() -> None:
    from phantomdeq.train.config import ConfigError, config_from_dict

    cfg = config_from_dict({"data": {"name": "digits", "mean": [0.2], "std": [0.4]}})
    assert cfg.data.mean == [0.2] and cfg.data.std == [0.4]
    bad = [
        ({"name": "digits", "mean": [0.2]}, "data.std: set both"),
        ({"name": "cifar10", "root": "x", "mean": [0.5], "std": [0.2]}, r"data.mean: .*\(3\)"),
        ({"name": "digits", "mean": [0.5], "std": [0.0]}, r"data.std: entries must be > 0"),
        ({"name": "digits", "mean": [float("nan")], "std": [1.0]}, r"data\.mean\[0\]: .*finite"),
    ]
    for data, match in bad:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"data": data})


def test_imagenet_config_streams_with_imagenet_constants() -> None:
    import yaml

    from phantomdeq.train.config import config_from_dict

    raw = yaml.safe_load(
        (Path(__file__).parents[1] / "configs" / "mdeq_imagenet18m.yaml").read_text()
    )
    cfg = config_from_dict(raw)
    d = cfg.data
    assert d.name == "imagefolder" and d.image_size == 224 and d.num_workers > 0
    assert tuple(d.mean or ()) == (0.485, 0.456, 0.406)
    assert tuple(d.std or ()) == (0.229, 0.224, 0.225)
