"""The data of a run: the data sets of a config (:func:`load_data`), deterministic batches for
training and evaluation with the per-step augmentation, and evaluation of a model in eval mode
(the metrics of its task) with precise-BatchNorm recalibration before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from phantomdeq.data import BatchLoader, augment_batch

from .build import as_output
from .config import Config, ConfigError
from .distributed import DistInfo, all_reduce_sum, seed_of
from .precision import autocast_context
from .tasks import Task

__all__ = [
    "info_get",
    "load_data",
    "prepare_data",
    "Batches",
    "augment",
    "evaluate",
    "forward_stats",
    "recalibrate_batchnorm",
    "seed_of",
    "unwrap",
]


# --- batches ----------------------------------------------------------------------------------


def augment(x: Tensor, cfg: Config, generator: torch.Generator) -> Tensor:
    """Batched random crop (zero padding of the normalised batch = mean padding) and flip of
    the in-memory data sets. Image folders are returned unchanged: their ``data.augment`` is
    the per-image random resized crop + flip applied by the loader (:class:`Batches`)."""
    if cfg.data.name == "imagefolder":
        return x
    return augment_batch(
        x, crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, generator=generator
    )


class Batches:
    """Deterministic batches of a data set for explicit index lists, through
    :class:`phantomdeq.data.BatchLoader`: in-memory ``images``/``labels`` tensors are sliced
    (no worker processes); streamed data sets (image folders) are decoded and transformed in
    ``num_workers`` persistent ``DataLoader`` workers (pinned memory on CUDA).

    Training passes give :meth:`iterate` the ``epoch`` and the run's ``seed``: each streamed
    item is then transformed with the seed ``(seed, epoch, index)``, so an epoch's pixels do
    not depend on ``num_workers`` or on where a resumed run starts. A data error in a worker
    (a truncated image) reaches the caller as a one-line :class:`phantomdeq.data.DataError`.
    """

    def __init__(self, dataset: Any, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.loader = BatchLoader(dataset, num_workers=num_workers)

    def __len__(self) -> int:
        return len(self.dataset)

    def iterate(
        self,
        batches: list[Tensor],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        *,
        epoch: int | None = None,
        seed: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield model-ready ``(x, y)`` on ``device`` (``x`` in ``dtype``) for each index batch;
        ``epoch``/``seed`` turn on the seeded per-item train transform of streamed data."""
        return self.loader.iterate(batches, device, dtype, epoch=epoch, seed=seed)

    def close(self) -> None:
        """Stop the loader's worker processes (restarted on the next pass)."""
        self.loader.close()


# --- evaluation and precise BatchNorm ---------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # DistributedDataParallel wraps the model
    return inner if isinstance(inner, nn.Module) else model


def forward_stats(info: Any, units: int | None = None) -> tuple[float, float, float]:
    """Sums over the batch of forward steps, relative residual and converged flags, each
    sample weighted by its ``units`` / batch-size share of the batch's units (a sequence of T
    tokens counts T times when a task averages over tokens; None: once)."""
    if info is None:
        return math.nan, math.nan, math.nan
    samples = max(int(info.nstep.numel()), 1)
    weight = 1.0 if units is None else units / samples
    return (
        weight * float(info.nstep.float().sum()),
        weight * float(info.rel_residual.float().sum()),
        weight * float(info.converged.float().sum()),
    )


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    dataset: Any,
    *,
    batches: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    dist_info: DistInfo | None = None,
    num_workers: int = 0,
    precision: str = "fp32",
) -> int:
    """Precise BatchNorm: reset the running statistics and recompute them as the plain average
    over ``batches`` batches of ``dataset`` (first samples, fixed order) run in eval mode -- the
    eval solver's states, no dropout -- with only the BatchNorm layers in training mode, in the
    compute ``precision`` of the run (``fp32`` | ``bf16`` | ``fp16``, autocast).

    Every rank takes an equal, non-empty shard of each batch, so synced BatchNorm layers see
    the global batch and every rank runs the same number of forwards -- the same sequence of
    collectives; a rank that ran one forward fewer would leave the others waiting in a
    SyncBatchNorm all-reduce. Hence with W ranks each batch has a multiple of W samples (the
    batch size rounded down to one, at least W) and the ``n mod W`` samples left over at the
    end of the ``min(len(dataset), batches * batch_size)`` used are dropped (none with one
    process). Returns the number of batches used (0 when the model has no BatchNorm)."""
    dist_info = dist_info or DistInfo()
    net = unwrap(model)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batches <= 0 or not norms:
        return 0
    was_training = net.training
    momenta = [m.momentum for m in norms]
    source = Batches(dataset, num_workers)
    world = dist_info.world_size
    step = max(batch_size - batch_size % world, world)
    n = min(len(source), batches * batch_size)
    n -= n % world
    order = torch.arange(n)
    chunks = [order[i : i + step][dist_info.rank :: world] for i in range(0, n, step)]
    if not chunks:  # fewer samples than ranks: keep the running statistics as they are
        return 0
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
        m.train()
    try:
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
        device = torch.device(device)
        for x, _ in source.iterate(chunks, device, dtype):
            with autocast_context(precision, device.type):
                net(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        net.train(was_training)
    return len(chunks)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    dist_info: DistInfo | None = None,
    num_workers: int = 0,
    precision: str = "fp32",
    task: Task | None = None,
) -> dict[str, float]:
    """The ``task``'s metrics (default image classification: ``test_loss``, ``test_acc``), the
    forward-solver statistics (``test_fwd_nstep``, ``test_fwd_residual``,
    ``test_fwd_converged``: mean steps, mean relative residual, share of converged units; NaN
    for a model without DEQ info) and the number of units ``test_n`` of ``model`` in eval mode
    (the eval solver) on ``dataset``, computed in ``precision`` (``fp32`` | ``bf16`` |
    ``fp16``: autocast; the loss in fp32)."""
    if task is None:
        from .tasks.classification import ImageClassification

        task = ImageClassification()
    names = task.metric_names
    dist_info = dist_info or DistInfo()
    device = torch.device(device)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    source = Batches(dataset, num_workers)
    order = torch.arange(len(source))
    batches = [
        order[i : i + batch_size][dist_info.rank :: dist_info.world_size]
        for i in range(0, len(source), batch_size)
    ]
    batches = [b for b in batches if b.numel() > 0]
    k = len(names)  # sums: the task's metrics, then units, forward steps, residual, converged
    sums = torch.zeros(k + 4, dtype=torch.float64)
    try:
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
        for x, y in source.iterate(batches, device, dtype):
            with autocast_context(precision, device.type):
                out = as_output(net(x))
            batch = task.metrics(out.prediction, y)
            for i, m in enumerate(names):
                sums[i] += batch[m]
            units = task.count(y)
            sums[k] += units
            nstep, res, conv = forward_stats(out.info, units)
            sums[k + 1] += nstep
            sums[k + 2] += res
            sums[k + 3] += conv
    finally:
        net.train(was_training)
    sums = all_reduce_sum(sums, dist_info)
    n = max(float(sums[k]), 1.0)
    return {
        **{f"test_{m}": float(sums[i]) / n for i, m in enumerate(names)},
        "test_fwd_nstep": float(sums[k + 1]) / n,
        "test_fwd_residual": float(sums[k + 2]) / n,
        "test_fwd_converged": float(sums[k + 3]) / n,
        "test_n": float(sums[k]),
    }


# --- the data sets of a config ----------------------------------------------------------------


def prepare_data(cfg: Config) -> None:
    """What must happen once before :func:`load_data`: the CIFAR-10 or MNIST download with
    ``data.download`` (safe for concurrent callers; a multi-process job calls it on rank 0
    and lets the other ranks wait at a barrier, so it is fetched once)."""
    from phantomdeq.data import prepare_dataset

    d = cfg.data
    if d.name == "text":  # a local file: nothing to prepare
        return
    prepare_dataset(d.name, d.root, download=d.download)


def load_data(cfg: Config, *, vocab: Any = None) -> tuple[Any, Any, Any]:
    """``(train, test, info)`` for ``cfg.data`` (:func:`phantomdeq.data.load_dataset`, or
    :func:`phantomdeq.data.load_text_dataset` for ``data.name: text``, given the ``vocab``
    saved with a resumed run); calls :func:`prepare_data` first (a no-op when the data are
    present).

    Raises:
        ConfigError: ``data.root`` is missing or lacks the expected files.
        phantomdeq.data.DataError: another data problem (one line naming the file or option,
            e.g. ``data.train_size`` above the size of the set); the commands report it with
            exit status 2.
    """
    from phantomdeq.data import load_dataset

    d = cfg.data
    if d.name == "text":
        from phantomdeq.data import load_text_dataset

        if d.path is None or d.context is None:  # validated configs always have both
            raise ConfigError("data.path and data.context: required for data set 'text'")
        return load_text_dataset(
            d.path,
            context=d.context,
            train_fraction=d.train_fraction,
            train_size=d.train_size,
            test_size=d.test_size,
            vocab=vocab,
        )
    if d.root is not None and not Path(d.root).is_dir() and not d.download:
        raise ConfigError(f"data.root: directory {d.root!r} does not exist")
    extra: dict[str, Any] = {}
    if d.name == "imagefolder":
        extra = {"image_size": d.image_size, "augment": d.augment, "flip": d.flip}
    try:
        prepare_data(cfg)
        return load_dataset(
            d.name,
            d.root,
            seed=cfg.train.seed,
            train_size=d.train_size,
            test_size=d.test_size,
            mean=d.mean,
            std=d.std,
            **extra,
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"data.root: {' '.join(str(exc).split())}") from exc


def info_get(info: Any, key: str) -> Any:
    if isinstance(info, dict):
        return info[key]
    return getattr(info, key)
