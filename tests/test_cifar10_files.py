"""CIFAR-10 files: restricted unpickling of the batches, and the concurrent-safe download."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import phantomdeq.data.cifar10 as cifar10
from phantomdeq.data import DataError, DataFileNotFoundError, load_dataset, prepare_dataset
from phantomdeq.data.safe_pickle import ALLOWED_GLOBALS

_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """Writes pickles as Python 2's cPickle wrote the real CIFAR-10 batches (protocol 2):
    ``str`` and ``bytes`` as byte-string opcodes (no global needed) and numpy's reconstruction
    function under its Python 2 name ``numpy.core.multiarray._reconstruct``."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_string
    dispatch[bytes] = _save_string

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__
        if module == "numpy._core.multiarray":
            module = "numpy.core.multiarray"
        self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
        self.memoize(obj)


def _py2_batch(name: str, data: np.ndarray, labels: list[int]) -> bytes:
    buf = io.BytesIO()
    batch = {
        "batch_label": f"{name} (test)",
        "labels": labels,
        "data": data,
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
    }
    _Py2Pickler(buf, protocol=2).dump(batch)
    return buf.getvalue()


def _write_py2_cifar(
    bdir: Path, n: int = 3, seed: int = 0
) -> dict[str, tuple[np.ndarray, list[int]]]:
    bdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name in _NAMES:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        (bdir / name).write_bytes(_py2_batch(name, data, labels))
        out[name] = (data, labels)
    return out


def _globals_of(raw: bytes) -> set[str]:
    import pickletools

    found = set()
    for op, arg, _ in pickletools.genops(raw):
        if op.name == "GLOBAL":
            found.add(str(arg).replace(" ", "."))
    return found


# ----------------------------------------------------------------------------- safe loading


def test_python2_format_batches_load_and_name_only_the_numpy_globals(tmp_path: Path) -> None:
    written = _write_py2_cifar(tmp_path / "cifar-10-batches-py")
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2, as the real files
    assert _globals_of(raw) == {
        "numpy.core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
    }
    assert {f"{m}.{n}" for m, n in ALLOWED_GLOBALS} >= _globals_of(raw)
    train, test, _ = load_dataset("cifar10", tmp_path)
    data, labels = written["data_batch_4"]
    assert torch.equal(train.images[9:12], torch.from_numpy(data.reshape(3, 3, 32, 32)))
    assert train.labels[9:12].tolist() == labels
    assert test.labels.tolist() == written["test_batch"][1]


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_planted_batch_is_refused_and_never_executed(tmp_path: Path) -> None:
    bdir = tmp_path / "cifar-10-batches-py"
    _write_py2_cifar(bdir)
    marker = tmp_path / "pwned"
    with open(bdir / "data_batch_1", "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump({"data": _Planted(marker), "labels": [0]})
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert str(bdir / "data_batch_1") in msg and f"{os.system.__module__}.system" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_object_arrays_and_other_globals_are_refused(tmp_path: Path) -> None:
    bdir = tmp_path / "cifar-10-batches-py"
    _write_py2_cifar(bdir)
    with open(bdir / "test_batch", "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump({"data": np.array([1, "x"], dtype=object), "labels": [0]})
    with pytest.raises(DataError, match=r"test_batch.*object dtype"):
        load_dataset("cifar10", tmp_path)
    with open(bdir / "test_batch", "wb") as fh:
        pickle.dump({b"data": torch.zeros(1), b"labels": [0]}, fh)
    with pytest.raises(DataError, match=r"test_batch.*torch"):
        load_dataset("cifar10", tmp_path)


def test_a_batch_repickled_by_python3_at_protocol_2_loads(tmp_path: Path) -> None:
    # Python 3's pickler writes bytes at protocol 2 as _codecs.encode(text, "latin1") and b""
    # as __builtin__.bytes(): both are admitted, in exactly that form
    bdir = tmp_path / "cifar-10-batches-py"
    written = _write_py2_cifar(bdir)
    data, labels = written["data_batch_2"]
    data = data.copy()
    data[0, :3] = (0, 128, 255)  # bytes outside ASCII go through latin1 unchanged
    content = {"data": data, "labels": labels, "batch_label": b"", "x": b"\xff"}
    for name, as_bytes in (("data_batch_2", True), ("test_batch", False)):
        batch = {(k.encode() if as_bytes else k): v for k, v in content.items()}
        with open(bdir / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    raw = (bdir / "data_batch_2").read_bytes()
    assert raw[:2] == b"\x80\x02" and "_codecs.encode" in _globals_of(raw)
    assert "__builtin__.bytes" in _globals_of(raw)
    train, test, _ = load_dataset("cifar10", tmp_path)
    assert torch.equal(train.images[3:6], torch.from_numpy(data.reshape(3, 3, 32, 32)))
    assert train.labels[3:6].tolist() == labels
    assert torch.equal(test.images, torch.from_numpy(data.reshape(3, 3, 32, 32)))


class _Encode:
    """Pickles as ``_codecs.encode(*args)``: the admitted global with other arguments."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        import _codecs

        return (_codecs.encode, self.args)


@pytest.mark.parametrize(
    "payload",
    [
        _Encode("x", "rot13"),
        _Encode("eJwDAAAAAAE=", "base64"),
        _Encode(b"x", "latin1"),
        _Encode("x"),
        _Encode("x", "latin1", "strict"),
    ],
    ids=["rot13", "base64", "bytes-arg", "one-arg", "errors-arg"],
)
def test_codecs_encode_is_admitted_only_as_latin1_of_a_str(tmp_path: Path, payload: Any) -> None:
    bdir = tmp_path / "cifar-10-batches-py"
    _write_py2_cifar(bdir)
    with open(bdir / "test_batch", "wb") as fh:
        pickle.dump({b"data": payload, b"labels": [0]}, fh, protocol=2)
    with pytest.raises(DataError, match=r"test_batch.*_codecs.encode is allowed only"):
        load_dataset("cifar10", tmp_path)


def test_bytes_is_admitted_only_without_arguments(tmp_path: Path) -> None:
    class Big:
        def __reduce__(self) -> tuple[Any, tuple[int]]:
            return (bytes, (10**12,))

    bdir = tmp_path / "cifar-10-batches-py"
    _write_py2_cifar(bdir)
    with open(bdir / "test_batch", "wb") as fh:
        pickle.dump({b"data": Big(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(DataError, match=r"test_batch.*bytes is allowed only as bytes\(\)"):
        load_dataset("cifar10", tmp_path)


# ----------------------------------------------------------------------------- download


def _cifar_tarball(path: Path) -> str:
    src = path.parent / "src"
    _write_py2_cifar(src / "cifar-10-batches-py", n=2)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return hashlib.md5(path.read_bytes()).hexdigest()


class _FakeServer:
    """``urlretrieve`` stand-in that copies a local tarball in chunks, slowly, so that
    concurrent callers overlap."""

    def __init__(self, tarball: Path, parties: int = 1, chunk: int = 4096) -> None:
        self.data = tarball.read_bytes()
        self.calls = 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(parties)
        self.chunk = chunk

    def __call__(self, url: str, filename: str | os.PathLike[str]) -> tuple[str, None]:
        assert url == cifar10.CIFAR10_URL
        with self.lock:
            self.calls += 1
        self.barrier.wait(timeout=30)
        with open(filename, "wb") as fh:
            for i in range(0, len(self.data), self.chunk):
                fh.write(self.data[i : i + self.chunk])
                fh.flush()
                time.sleep(0.002)
        return str(filename), None


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _FakeServer:
    tarball = tmp_path / "upstream" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    md5 = _cifar_tarball(tarball)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", md5)
    fake = _FakeServer(tarball)
    monkeypatch.setattr(cifar10.urllib.request, "urlretrieve", fake)
    return fake


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_download_prepare_then_load_and_idempotent(tmp_path: Path, server: _FakeServer) -> None:
    root = tmp_path / "data"
    with pytest.raises(DataFileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", root)  # load only reads
    assert server.calls == 0
    prepare_dataset("cifar10", root, download=True)
    assert server.calls == 1
    train, test, _ = load_dataset("cifar10", root)
    assert (len(train), len(test)) == (10, 2)
    prepare_dataset("cifar10", root, download=True)
    load_dataset("cifar10", root, download=True)
    assert server.calls == 1  # present: nothing fetched again
    assert _leftovers(root) == []


def test_concurrent_downloads_all_succeed_without_leftovers(
    tmp_path: Path, server: _FakeServer
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    callers = 4
    server.barrier = threading.Barrier(callers)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            cifar10.download_cifar10(root)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert server.calls == callers  # they really overlapped: all were downloading
    train, test, _ = load_dataset("cifar10", root)
    assert (len(train), len(test)) == (10, 2)
    assert _leftovers(root) == []
    assert sorted(p.name for p in root.iterdir()) == [
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]


def test_download_with_wrong_md5_is_refused_and_cleaned_up(
    tmp_path: Path, server: _FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="md5") as err:
        prepare_dataset("cifar10", root, download=True)
    assert "\n" not in str(err.value)
    assert list(root.iterdir()) == []


def test_partial_batch_folder_is_completed(tmp_path: Path, server: _FakeServer) -> None:
    root = tmp_path / "data"
    bdir = root / "cifar-10-batches-py"
    _write_py2_cifar(bdir, n=2)
    (bdir / "data_batch_3").unlink()
    prepare_dataset("cifar10", root, download=True)
    assert (bdir / "data_batch_3").is_file()
    train, _, _ = load_dataset("cifar10", root)
    assert len(train) == 10
    assert _leftovers(root) == []
