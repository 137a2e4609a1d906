"""``data.download: true`` for MNIST: the files come from a mirror and are checked against the
published MD5s -- tested offline against a ``file://`` mirror the test writes."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from phantomdeq.data import DataError, load_dataset, prepare_dataset
from phantomdeq.data import mnist_download as md
from phantomdeq.train.config import config_from_dict

SIZES = {"train": 30, "t10k": 12}


def _idx_gz(arr: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x00000800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)


def _mirror(tmp_path: Path) -> tuple[str, dict[str, str], dict[str, np.ndarray]]:
    """A folder with the four gzipped IDX files; its file:// URL, their MD5s and the arrays."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    rng = np.random.default_rng(0)
    md5s: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}
    for prefix, n in SIZES.items():
        for kind, arr in (
            ("images-idx3", rng.integers(0, 256, size=(n, 28, 28))),
            ("labels-idx1", rng.integers(0, 10, size=(n,))),
        ):
            name = f"{prefix}-{kind}-ubyte.gz"
            data = _idx_gz(arr)
            (mirror / name).write_bytes(data)
            md5s[name] = hashlib.md5(data).hexdigest()
            arrays[name] = arr
    return mirror.as_uri() + "/", md5s, arrays


def test_published_md5s_are_the_ones_checked() -> None:
    # the four files of the MNIST distribution and the MD5s published with them
    assert md.MNIST_FILES == {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }


def test_download_fetches_checks_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5s, arrays = _mirror(tmp_path)
    monkeypatch.setattr(md, "MNIST_FILES", md5s)
    monkeypatch.setattr(md, "MNIST_MIRRORS", (url,))
    root = tmp_path / "data"
    prepare_dataset("mnist", root, download=True)
    assert sorted(p.name for p in root.iterdir()) == sorted(md5s)
    train, test, info = load_dataset("mnist", root)
    assert (len(train), len(test)) == (SIZES["train"], SIZES["t10k"])  # the standard split
    assert np.array_equal(train.labels.numpy(), arrays["train-labels-idx1-ubyte.gz"])
    assert info.name == "mnist"


def test_a_download_with_the_wrong_md5_is_refused_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, md5s, _ = _mirror(tmp_path)
    bad = dict(md5s, **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setattr(md, "MNIST_FILES", bad)
    root = tmp_path / "data"
    with pytest.raises(
        DataError, match=r"t10k-images-idx3-ubyte\.gz.*md5 [0-9a-f]{32}, expected 0{32}"
    ):
        md.download_mnist(root, mirrors=(url,))
    assert not (root / "t10k-images-idx3-ubyte.gz").exists()
    assert not list(root.glob(".*.part"))  # no temporary file left behind


def test_the_next_mirror_is_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5s, _ = _mirror(tmp_path)
    monkeypatch.setattr(md, "MNIST_FILES", md5s)
    dead = (tmp_path / "no-such-mirror").as_uri() + "/"
    root = md.download_mnist(tmp_path / "data", mirrors=(dead, url))
    assert len(list(root.glob("*.gz"))) == 4


def test_every_mirror_failing_names_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, md5s, _ = _mirror(tmp_path)
    monkeypatch.setattr(md, "MNIST_FILES", md5s)
    dead = (tmp_path / "gone").as_uri() + "/"
    with pytest.raises(DataError, match=r"could not download train-images-idx3-ubyte\.gz: file:"):
        md.download_mnist(tmp_path / "data", mirrors=(dead,))


def test_present_files_are_not_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, md5s, _ = _mirror(tmp_path)
    monkeypatch.setattr(md, "MNIST_FILES", md5s)
    root = md.download_mnist(tmp_path / "data", mirrors=(url,))

    def no_fetch(url: str, dest: Path) -> None:
        raise AssertionError(f"fetched {url} again")

    monkeypatch.setattr(md, "_fetch", no_fetch)
    assert md.download_mnist(root, mirrors=(url,)) == root


def test_config_accepts_download_for_mnist_only(tmp_path: Path) -> None:
    cfg = config_from_dict({"data": {"name": "mnist", "root": str(tmp_path), "download": True}})
    assert cfg.data.download is True
    with pytest.raises(ValueError, match=r"data\.download: only names 'mnist' and 'cifar10'"):
        config_from_dict({"data": {"name": "digits", "download": True}})
