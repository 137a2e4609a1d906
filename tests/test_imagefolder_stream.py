"""Streaming image folders: ImageNet transforms against their geometric definition, seeded and
resumable randomness, the batch loader (workers, errors), memory independent of the set size."""

from __future__ import annotations

import math
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phantomdeq.data import BatchLoader, DataError, ImageFolderDataset, item_seed, load_dataset
from phantomdeq.data.image_transforms import (
    eval_transform,
    random_resized_crop_box,
    train_transform,
)


def _jpeg_folder(root: Path, per_class: int, size: int = 64, classes: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                im = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
                im.save(d / f"{i:05d}.jpg", quality=90)


def _gradient_image(width: int, height: int) -> Image.Image:
    """R = column index, G = row index (both < 256), B = 0."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    arr[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- transforms


def test_random_resized_crop_box_distribution() -> None:
    """With scale (0.08, 0.5) no draw is rejected on a square image, so the area fraction is
    U(0.08, 0.5) and log(w/h) is U(log 3/4, log 4/3) (up to rounding to whole pixels)."""
    rng = np.random.default_rng(0)
    side = 1000
    fractions, log_ratios = [], []
    for _ in range(4000):
        left, top, w, h = random_resized_crop_box(side, side, rng, scale=(0.08, 0.5))
        assert left >= 0 and left + w <= side and top >= 0 and top + h <= side
        fractions.append(w * h / side**2)
        log_ratios.append(math.log(w / h))
    f, r = np.array(fractions), np.array(log_ratios)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert f.min() > 0.079 and f.max() < 0.501
    assert r.min() > lo - 0.01 and r.max() < hi + 0.01
    # uniform moments, 4000 samples: standard errors ~0.002 (mean) / ~0.003 (log-ratio mean)
    assert abs(f.mean() - 0.29) < 0.01 and abs(f.std() - 0.42 / math.sqrt(12)) < 0.01
    assert abs(r.mean()) < 0.015 and abs(r.std() - (hi - lo) / math.sqrt(12)) < 0.01


def test_random_resized_crop_box_fallback_is_centred_and_clamped() -> None:
    # a 400x10 strip: no box of area >= 8% with ratio <= 4/3 fits, so the fallback crops the
    # centre to ratio 4/3 at full height
    rng = np.random.default_rng(0)
    assert random_resized_crop_box(400, 10, rng) == ((400 - 13) // 2, 0, 13, 10)
    assert random_resized_crop_box(10, 400, rng) == (0, (400 - 13) // 2, 10, 13)


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_samples_the_box_bilinearly(seed: int) -> None:
    """On an image whose pixels are their own coordinates, output pixel (u, v) of a box
    (left, top, w, h) resized to S must show the source point left + (u + 0.5) w / S - 0.5
    (a linear function is reproduced by the normalised bilinear filter away from the edges),
    mirrored when flipped."""
    image = _gradient_image(240, 200)
    size = (24, 32)  # (height, width)
    left, top, w, h = random_resized_crop_box(240, 200, np.random.default_rng(seed))
    out = np.asarray(train_transform(image, size, np.random.default_rng(seed)), dtype=float)
    assert out.shape == (24, 32, 3)
    u = np.arange(size[1])
    v = np.arange(size[0])
    x = left + (u + 0.5) * w / size[1] - 0.5
    y = top + (v + 0.5) * h / size[0] - 0.5
    inner_u, inner_v = slice(3, -3), slice(3, -3)
    rows = out[size[0] // 2, :, 0]
    flipped = rows[0] > rows[-1]
    expected_x = x[::-1] if flipped else x
    assert np.abs(rows[inner_u] - expected_x[inner_u]).max() <= 1.0
    assert np.abs(out[:, size[1] // 2, 1][inner_v] - y[inner_v]).max() <= 1.0


def test_train_transform_flips_about_half_the_time() -> None:
    image = _gradient_image(64, 64)
    flips = 0
    for seed in range(400):
        out = np.asarray(train_transform(image, (16, 16), np.random.default_rng(seed)))
        flips += int(out[8, 0, 0] > out[8, -1, 0])
    assert 160 < flips < 240  # Binomial(400, 1/2): mean 200, sd 10
    never = [
        np.asarray(train_transform(image, (16, 16), np.random.default_rng(s), flip=False))
        for s in range(50)
    ]
    assert all(o[8, 0, 0] < o[8, -1, 0] for o in never)


def test_eval_transform_is_resize_shorter_side_then_centre_crop() -> None:
    # 240 wide x 120 high to 60: the shorter side goes to round(60 * 256 / 224) = 69, the
    # longer to int(69 * 240 / 120) = 138; the crop starts at (round(39.0), round(4.5)) = (39, 4)
    image = _gradient_image(240, 120)
    out = np.asarray(eval_transform(image, (60, 60)), dtype=float)
    assert out.shape == (60, 60, 3)
    u = np.arange(60)
    x = (39 + u + 0.5) * 240 / 138 - 0.5
    y = (4 + u + 0.5) * 120 / 69 - 0.5
    assert np.abs(out[30, 2:-2, 0] - x[2:-2]).max() <= 1.0
    assert np.abs(out[2:-2, 30, 1] - y[2:-2]).max() <= 1.0
    # a tall image: the same with the axes exchanged
    tall = np.asarray(eval_transform(_gradient_image(120, 240), (60, 60)), dtype=float)
    assert np.abs(tall[2:-2, 30, 1] - x[2:-2]).max() <= 1.0


# ----------------------------------------------------------------------------- data set + loader


def test_streaming_items_normalised_with_configured_constants(tmp_path: Path) -> None:
    _jpeg_folder(tmp_path, 3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    train, val, info = load_dataset("imagefolder", tmp_path, image_size=56, mean=mean, std=std)
    assert isinstance(train, ImageFolderDataset) and info.mean == mean and info.std == std
    loader = BatchLoader(val)
    (x, y), *_ = list(loader.iterate([torch.tensor([1, 0])], "cpu"))
    raw1, label1 = val.load(1)
    with Image.open(val.path(1)) as im:
        direct = np.asarray(eval_transform(im.convert("RGB"), (56, 56)))
    assert np.array_equal(raw1.permute(1, 2, 0).numpy(), direct)
    expected = (raw1.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    assert x.shape == (2, 3, 56, 56) and x.dtype == torch.float32
    assert torch.allclose(x[0], expected, atol=1e-6) and y.tolist() == [label1, val.load(0)[1]]
    x64, _ = next(iter(loader.iterate([[0]], "cpu", torch.float64)))
    assert x64.dtype == torch.float64


def _epoch(loader: BatchLoader, batches: list[torch.Tensor], epoch: int) -> list[torch.Tensor]:
    return [x for x, _ in loader.iterate(batches, "cpu", epoch=epoch, seed=7)]


def test_augmented_items_are_reproducible_across_workers_batches_and_resume(
    tmp_path: Path,
) -> None:
    _jpeg_folder(tmp_path, 6)
    train, _, _ = load_dataset("imagefolder", tmp_path, image_size=32, augment=True)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    batches = list(order.split(4))
    ref = _epoch(BatchLoader(train, num_workers=0), batches, epoch=3)
    two = BatchLoader(train, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(ref, _epoch(two, batches, epoch=3)))
    # a resumed epoch starting at batch 2 sees the same pixels
    tail = _epoch(two, batches[2:], epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(ref[2:], tail))
    # an item's pixels do not depend on the batch it falls in
    single = _epoch(BatchLoader(train), [order[5:6]], epoch=3)[0]
    assert torch.equal(single[0], ref[1][1])
    # they are a function of (seed, epoch, index)
    raw, _ = train.load(int(order[5]), item_seed(7, 3, int(order[5])))
    assert torch.equal(train.normalize(raw), single[0])
    other = _epoch(two, batches, epoch=4)
    assert not any(torch.equal(a, b) for a, b in zip(ref, other))
    # without an epoch: the deterministic eval transform
    plain = [x for x, _ in BatchLoader(train).iterate(batches[:1], "cpu")]
    assert torch.equal(plain[0][0], train[int(batches[0][0])][0])


def test_persistent_workers_serve_several_passes(tmp_path: Path) -> None:
    _jpeg_folder(tmp_path, 4)
    train, _, _ = load_dataset("imagefolder", tmp_path, image_size=16, augment=True)
    loader = BatchLoader(train, num_workers=1)
    batches = [torch.arange(0, 4), torch.arange(4, 8)]
    first = _epoch(loader, batches, 0)
    data_loader = loader._loader
    # a pass abandoned halfway does not disturb the next one
    next(iter(loader.iterate(batches, "cpu", epoch=1, seed=7)))
    again = _epoch(loader, batches, 0)
    assert loader._loader is data_loader
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("workers", [0, 1])
def test_loading_leaves_the_global_rng_alone(tmp_path: Path, workers: int) -> None:
    """The trainer seeds the global torch RNG per epoch for dropout and probes; starting a
    pass (which starts a DataLoader iterator) must not draw from it."""
    _jpeg_folder(tmp_path, 2)
    train, _, _ = load_dataset("imagefolder", tmp_path, image_size=8, augment=True)
    loader = BatchLoader(train, num_workers=workers)
    torch.manual_seed(123)
    for epoch in range(2):
        list(loader.iterate([torch.arange(4)], "cpu", epoch=epoch))
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_image_is_one_data_error_naming_it(tmp_path: Path, workers: int) -> None:
    _jpeg_folder(tmp_path, 3)
    bad = tmp_path / "train" / "class1" / "00001.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    train, _, _ = load_dataset("imagefolder", tmp_path, image_size=16)
    loader = BatchLoader(train, num_workers=workers)
    with pytest.raises(DataError) as err:
        list(loader.iterate([torch.arange(len(train))], "cpu"))
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg and "Traceback" not in msg
    assert type(err.value) is DataError


def test_corrupt_png_is_named(tmp_path: Path) -> None:
    root = tmp_path
    for split in ("train", "val"):
        d = root / split / "a"
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(d / "0.png")
    bad = root / "train" / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:40])
    train, _, _ = load_dataset("imagefolder", root, image_size=8)
    with pytest.raises(DataError, match="cannot decode") as err:
        train.load(0)
    assert str(bad) in str(err.value)


# ----------------------------------------------------------------------------- memory


def _peak_bytes(fn: object) -> int:
    tracemalloc.start()
    try:
        fn()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    """From N to 8N images: loading the set allocates a few dozen bytes per image (file names),
    never the pixels; one batch's peak allocation is the same."""
    n = 16
    small, large = tmp_path / "small", tmp_path / "large"
    _jpeg_folder(small, n // 2, size=64)
    _jpeg_folder(large, 8 * n // 2, size=64)

    def load(root: Path) -> ImageFolderDataset:
        train, _, _ = load_dataset("imagefolder", root, image_size=56)
        return train

    load(small)  # warm up imports and caches
    peak_small = _peak_bytes(lambda: load(small))
    peak_large = _peak_bytes(lambda: load(large))
    decoded = 56 * 56 * 3  # bytes of one decoded image
    assert (peak_large - peak_small) / (7 * n) < 0.1 * decoded
    ds_small, ds_large = load(small), load(large)
    per_image = (len(pickle.dumps(ds_large)) - len(pickle.dumps(ds_small))) / (7 * n)
    assert per_image < 100  # a name and a label, not pixels

    def one_batch(ds: ImageFolderDataset) -> None:
        next(iter(BatchLoader(ds).iterate([torch.arange(8)], "cpu")))

    one_batch(ds_small)  # warm up imports and caches
    batch_small = _peak_bytes(lambda: one_batch(ds_small))
    batch_large = _peak_bytes(lambda: one_batch(ds_large))
    assert batch_large < 1.25 * batch_small + 16 * 1024


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_pinned_and_equal_to_cpu(tmp_path: Path) -> None:
    _jpeg_folder(tmp_path, 4)
    train, _, _ = load_dataset("imagefolder", tmp_path, image_size=32, augment=True)
    batches = list(torch.arange(len(train)).split(3))
    cpu = _epoch(BatchLoader(train, num_workers=2), batches, epoch=1)
    loader = BatchLoader(train, num_workers=2)
    gpu = [(x, y) for x, y in loader.iterate(batches, "cuda", epoch=1, seed=7)]
    assert loader._loader is not None and loader._loader.pin_memory
    assert all(x.is_cuda and y.is_cuda and x.dtype == torch.float32 for x, y in gpu)
    # normalisation on the GPU vs the CPU: the same IEEE operations
    assert all(torch.allclose(a, x.cpu(), atol=1e-6) for a, (x, _) in zip(cpu, gpu))
