"""Training on a streamed image folder: worker count does not change the run, data errors in
workers stop it with one line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("yaml")

from phantomdeq.data import DataError, ImageFolderDataset, item_seed  # noqa: E402
from phantomdeq.train import run_training  # noqa: E402


def _folder(root: Path, per_class: int = 8) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
                im = Image.fromarray(small).resize((40, 30), Image.Resampling.BICUBIC)
                im.save(d / f"{i}.jpg", quality=90)


def _config(root: Path, workers: int) -> dict[str, Any]:
    return {
        "model": {"name": "mdeq_tiny", "dropout": 0.0},
        "data": {
            "name": "imagefolder",
            "root": str(root),
            "image_size": 16,
            "augment": True,
            "batch_size": 8,
            "eval_batch_size": 8,
            "num_workers": workers,
        },
        "solver": {"name": "anderson", "max_iter": 4, "tol": 1e-3},
        "grad": {"name": "upg", "k": 2, "lam": 0.5},
        "optim": {"name": "adam", "lr": 3e-3, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"epochs": 1, "seed": 0, "num_threads": 1, "bn_recalibration_batches": 1},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }


def _params(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    return dict(state["model"])


@pytest.mark.slow
def test_streamed_training_does_not_depend_on_num_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    _folder(root)
    calls: list[tuple[str, int, Any]] = []
    load = ImageFolderDataset.load

    def recording_load(self: ImageFolderDataset, index: int, seed: Any = None) -> Any:
        calls.append((self.root.name, index, seed))
        return load(self, index, seed)

    monkeypatch.setattr(ImageFolderDataset, "load", recording_load)
    a = run_training(_config(root, 0), tmp_path / "w0", progress=False)
    monkeypatch.undo()
    # the training pass transforms item i with the seed (train.seed, epoch, i); precise-BN
    # recalibration and evaluation use the deterministic eval transform
    train_calls = [(i, s) for split, i, s in calls if split == "train" and s is not None]
    assert sorted(i for i, _ in train_calls) == list(range(16))
    assert all(s == item_seed(0, 0, i) for i, s in train_calls)
    assert all(s is None for split, _, s in calls if split == "val")
    b = run_training(_config(root, 2), tmp_path / "w2", progress=False)
    assert a["steps"] == b["steps"] == 2 and a["test_acc"] == b["test_acc"]
    pa, pb = _params(tmp_path / "w0"), _params(tmp_path / "w2")
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_truncated_image_stops_training_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _folder(root)
    bad = root / "train" / "b" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        run_training(_config(root, 1), tmp_path / "run", progress=False)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_batched_crop_is_not_applied_on_top_of_the_per_image_transform() -> None:
    from phantomdeq.train.config import config_from_dict
    from phantomdeq.train.data import augment

    x = torch.randn(4, 3, 8, 8)
    folder = config_from_dict({"data": {"name": "imagefolder", "root": ".", "augment": True}})
    assert augment(x, folder, torch.Generator().manual_seed(0)) is x
    digits = config_from_dict({"data": {"name": "digits", "augment": True}})
    assert not torch.equal(augment(x, digits, torch.Generator().manual_seed(0)), x)


def test_a_bad_evaluation_image_keeps_the_trained_epoch(tmp_path: Path) -> None:
    """A corrupt image in val/ is met only by the evaluation after a trained epoch: last.pt is
    written first (every batch done, not yet evaluated), the error names the file and says so;
    once the file is fixed, --resume evaluates and ends as an uninterrupted run."""
    root = tmp_path / "images"
    _folder(root)
    reference = run_training(_config(root, 0), tmp_path / "reference", progress=False)
    bad = root / "val" / "b" / "1.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    run = tmp_path / "run"
    with pytest.raises(DataError) as err:
        run_training(_config(root, 0), run, progress=False)
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg
    assert f"epoch 1's training is saved in {str(run / 'last.pt')!r}" in msg
    saved = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (0, 2, 2)
    bad.write_bytes(good)
    result = run_training(_config(root, 0), run, resume=True, progress=False)
    assert result["steps"] == reference["steps"] == 2
    assert result["test_acc"] == reference["test_acc"]
    pa, pb = _params(tmp_path / "reference"), _params(run)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
