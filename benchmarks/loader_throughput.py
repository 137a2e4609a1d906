"""Question: how many images per second does the data path deliver on this machine?

Streaming image folders (``BatchLoader`` over ``ImageFolderDataset``): generated JPEGs read,
decoded with Pillow, transformed (ImageNet train: random resized crop + flip; eval: resize the
shorter side + centre crop) and normalised, for ``num_workers`` 0, 1, 2, at 256x256 -> 224 and
64x64 -> 56. The files are in the page cache after the first pass: this measures decoding and
transforms, not the disk. In-memory tensors (CIFAR-shaped uint8): the loader's fast path (slice,
normalise, batched crop + flip) against a ``DataLoader`` doing the same per item in 0 or 2
worker processes -- the measurement behind keeping the tensor sets off the ``DataLoader``.

Per case, one loader per worker count, each warmed up by one pass (starting its persistent
workers); then ``--repeats`` rounds of one timed pass per loader, alternating between them so
machine noise spreads evenly; the median images/s and the median CPU time the calling process
spends per image (every pass a new epoch: new order, new crops; batch ``--batch``).

    python benchmarks/loader_throughput.py [--n224 256] [--n56 1024] [--repeats 5]
        [--out benchmarks/results/loader_throughput.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402
from phantomdeq.data import (  # noqa: E402
    BatchLoader,
    ImageTensorDataset,
    augment_batch,
    load_dataset,
)


def write_jpegs(root: Path, n: int, size: int, classes: int = 8, seed: int = 0) -> None:
    """``n`` smooth random RGB JPEGs (quality 90) of ``size x size`` in ``root/train/<class>``
    and one per class in ``root/val`` -- photograph-like entropy, unlike white noise."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            im = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.int16) + rng.integers(-6, 7, size=(size, size, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)


def interleaved_passes(
    runs: dict[Any, Callable[[int], int]], repeats: int
) -> dict[Any, dict[str, Any]]:
    """One warm-up pass of each run (its wall time: ``first_pass_s``; starts persistent
    workers), then ``repeats`` rounds of one timed pass per run, alternating so that machine
    noise spreads evenly. Per run: the median images/s and the median CPU time of *this*
    process per image (all the decoding when ``num_workers=0``; with workers, what the
    training process itself still spends)."""
    first: dict[Any, float] = {}
    for key, run in runs.items():
        t0 = time.perf_counter()
        run(0)
        first[key] = time.perf_counter() - t0
    rates: dict[Any, list[float]] = {k: [] for k in runs}
    cpu: dict[Any, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        for key, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            n = run(r + 1)
            rates[key].append(n / (time.perf_counter() - t0))
            cpu[key].append(1e3 * (time.process_time() - c0) / n)
    return {
        k: {
            "first_pass_s": first[k],
            "images_per_s": statistics.median(rates[k]),
            "main_cpu_ms_per_image": statistics.median(cpu[k]),
            "rates": rates[k],
        }
        for k in runs
    }


def epoch_batches(n: int, batch: int, epoch: int) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
    return list(order.split(batch))


def bench_stream(
    root: Path, out_size: int, workers: list[int], batch: int, repeats: int, train: bool
) -> dict[int, dict[str, Any]]:
    ds, _, _ = load_dataset("imagefolder", root, image_size=out_size, augment=train)
    loaders = {w: BatchLoader(ds, num_workers=w) for w in workers}

    def runner(loader: BatchLoader) -> Callable[[int], int]:
        def run_pass(epoch: int) -> int:
            count = 0
            batches = epoch_batches(len(ds), batch, epoch)
            for x, _ in loader.iterate(batches, "cpu", epoch=epoch if train else None):
                count += x.shape[0]
            return count

        return run_pass

    out = interleaved_passes({w: runner(lo) for w, lo in loaders.items()}, repeats)
    for lo in loaders.values():
        lo.close()
    return {w: {"images": len(ds), **r} for w, r in out.items()}


class _PerItem(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """An in-memory set seen only through ``dataset[i]``: what a DataLoader route would do."""

    def __init__(self, ds: ImageTensorDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ds[i]


def bench_tensors(n: int, batch: int, repeats: int) -> dict[str, dict[str, Any]]:
    """The fast path (slice + normalise the batch) against a persistent-worker DataLoader
    normalising per item with 0 or 2 workers; both then crop + flip the batch."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    ds = ImageTensorDataset(images, labels, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    gen = torch.Generator().manual_seed(1)
    loaders = {
        "fast path (slice)": BatchLoader(ds),
        "DataLoader per item, 0 workers": BatchLoader(_PerItem(ds), num_workers=0),
        "DataLoader per item, 2 workers": BatchLoader(_PerItem(ds), num_workers=2),
    }

    def runner(loader: BatchLoader) -> Callable[[int], int]:
        def run_pass(epoch: int) -> int:
            count = 0
            for x, _ in loader.iterate(epoch_batches(n, batch, epoch), "cpu"):
                count += augment_batch(x, crop_padding=4, generator=gen).shape[0]
            return count

        return run_pass

    out = interleaved_passes({k: runner(lo) for k, lo in loaders.items()}, repeats)
    for lo in loaders.values():
        lo.close()
    return {k: {"images": n, **r} for k, r in out.items()}


def _row(case: str, workers: object, r: dict[str, Any]) -> list[object]:
    return [
        case,
        workers,
        r["images"],
        r["first_pass_s"],
        r["images_per_s"],
        r["main_cpu_ms_per_image"],
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n224", type=int, default=256, help="generated 256x256 JPEGs")
    ap.add_argument("--n56", type=int, default=1024, help="generated 64x64 JPEGs")
    ap.add_argument("--ntensor", type=int, default=10000, help="in-memory 3x32x32 images")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)
    rows: list[list[object]] = []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        sets = {
            (256, 224): (Path(tmp) / "jpeg256", args.n224),
            (64, 56): (Path(tmp) / "jpeg64", args.n56),
        }
        for (src, _), (root, n) in sets.items():
            write_jpegs(root, n, src)
        for (src, out), (root, _) in sets.items():
            for train in (True, False):
                case = f"jpeg {src}->{out} {'train' if train else 'eval'}"
                res = bench_stream(root, out, workers, args.batch, args.repeats, train)
                for w, r in res.items():
                    results.append({"case": case, "num_workers": w, **r})
                    rows.append(_row(case, w, r))
                print(f"{case}: done", file=sys.stderr)
    for label, r in bench_tensors(args.ntensor, 128, args.repeats).items():
        case = f"tensors 3x32x32 + crop/flip, {label}"
        results.append({"case": case, **r})
        rows.append(_row(case, "-", r))
    print_table(["case", "workers", "images", "first pass s", "images/s", "main CPU ms/img"], rows)
    payload = {
        "machine": machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "batch": args.batch,
        "repeats": args.repeats,
        "results": results,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
