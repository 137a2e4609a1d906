"""The training loop for image classifiers built on DEQ models (MDEQ).

One :class:`Trainer` run: load the data set, build the model with the configured forward
solvers and gradient estimator (paper Sec. 2: IFT eq. 4, UPG eq. 17, NPG eq. 18, ...), then for
each epoch iterate over a deterministic per-epoch order, optionally starting with the MDEQ
unrolled pre-training stage, evaluate, log and checkpoint.

Reproducibility: the global sample order of an epoch depends only on ``(seed, epoch)``; the
generator that drives augmentation and the variational-dropout masks of each step is seeded
from ``(seed, epoch, step, rank)``; the global torch RNG (anything else random, e.g. the
Hutchinson probes of the Jacobian regulariser) is re-seeded from ``(seed, epoch, rank)`` at the
start of every epoch; checkpoints are written at epoch boundaries and also carry the RNG
states. Hence a run interrupted and resumed with ``resume=True`` makes the same updates as an
uninterrupted one.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import (
    Config,
    ConfigError,
    GradConfig,
    SolverConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup,
    convert_batchnorm,
    epoch_permutation,
    init_distributed,
    shard_batches,
)
from .metrics_log import MetricsLogger, plot_curves, read_metrics

__all__ = [
    "LRSchedule",
    "Trainer",
    "TrainingError",
    "build_grad",
    "build_solver",
    "evaluate",
    "run_training",
]


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss or state); the message says where and which
    checkpoint is the last good one."""


# --------------------------------------------------------------------------- builders


def build_solver(cfg: SolverConfig) -> Any:
    """``pdq.solvers.from_name`` for a :class:`SolverConfig`."""
    import phantomdeq.solvers as solvers

    return solvers.from_name(cfg.name, **cfg.kwargs())


def build_grad(cfg: GradConfig) -> Any:
    """``pdq.grad.from_name`` for a :class:`GradConfig` (IFT gets its backward solver)."""
    import phantomdeq.grad as grad

    if cfg.name == "ift":
        return grad.from_name("ift", solver=build_solver(cfg.backward_solver))
    if cfg.name == "upg":
        return grad.from_name("upg", k=cfg.k, lam=cfg.lam, checkpoint=cfg.checkpoint)
    if cfg.name == "npg":
        return grad.from_name("npg", k=cfg.k, lam=cfg.lam)
    return grad.from_name(cfg.name)


def _build_model(cfg: Config, num_classes: int, in_channels: int) -> nn.Module:
    """``phantomdeq.models.build_model``; with ``model.dropout`` / ``model.overrides`` set, the
    named MDEQ configuration is modified first (``with_overrides``)."""
    from phantomdeq.models import build_model

    m = cfg.model
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "solver": build_solver(cfg.solver),
        "grad": build_grad(cfg.grad),
        "eval_solver": None if cfg.eval_solver is None else build_solver(cfg.eval_solver),
    }
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in m.overrides.items()}
    if m.dropout is not None:
        changes["dropout"] = m.dropout
    try:
        if not changes:
            return build_model(m.name, **kwargs)
        from phantomdeq.models.mdeq import MDEQ, mdeq_config, with_overrides

        return MDEQ(with_overrides(mdeq_config(m.name), **changes), **kwargs)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from exc


def _load_data(cfg: Config) -> tuple[Any, Any, Any]:
    from phantomdeq.data import load_dataset

    d = cfg.data
    if d.root is not None and not Path(d.root).is_dir() and not d.download:
        raise ConfigError(f"data.root: directory {d.root!r} does not exist")
    extra: dict[str, Any] = {} if d.image_size is None else {"image_size": d.image_size}
    try:
        return load_dataset(
            d.name,
            d.root,
            download=d.download,
            seed=cfg.train.seed,
            train_size=d.train_size,
            test_size=d.test_size,
            **extra,
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"data.root: {exc}") from exc


def _info_get(info: Any, key: str) -> Any:
    if isinstance(info, dict):
        return info[key]
    return getattr(info, key)


def _augment(x: Tensor, cfg: Config, generator: torch.Generator) -> Tensor:
    """Batched random crop (zero padding of the normalised batch = mean padding) and flip."""
    from phantomdeq.data.transforms import augment_batch

    return augment_batch(
        x, crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, generator=generator
    )


def _seed_of(*parts: int) -> int:
    """A 63-bit seed mixing integers (stable across processes and Python versions)."""
    h = 1469598103934665603
    for p in parts:
        h ^= int(p) & 0xFFFFFFFFFFFFFFFF
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # DistributedDataParallel wraps the model
    return inner if isinstance(inner, nn.Module) else model


# --------------------------------------------------------------------------- schedule


class LRSchedule:
    """Per-iteration learning rate: linear warm-up then cosine decay (or constant).

    ``lr(t) = lr * (t + 1) / warmup`` for ``t < warmup``, then
    ``min_lr + (lr - min_lr) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        kind: str = "cosine",
    ) -> None:
        if kind not in ("cosine", "constant"):
            raise ValueError(f"LRSchedule: kind must be 'cosine' or 'constant', got {kind!r}")
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.kind = kind
        self.last_step = -1

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max(step - self.warmup_steps, 0), span) / span
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def set_step(self, step: int) -> float:
        """Set the learning rate of every parameter group for iteration ``step``."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr": self.min_lr,
            "kind": self.kind,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])


# --------------------------------------------------------------------------- batches


class _Batches:
    """Deterministic batches from a data set: a fast path for in-memory ``images``/``labels``
    tensors, a ``DataLoader`` over explicit index lists otherwise."""

    def __init__(self, dataset: Any, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        images = getattr(dataset, "images", None)
        labels = getattr(dataset, "labels", None)
        self.tensors = isinstance(images, Tensor) and isinstance(labels, Tensor)
        self.images: Tensor | None = images if self.tensors else None
        self.labels: Tensor | None = labels if self.tensors else None

    def __len__(self) -> int:
        return len(self.dataset)

    def iterate(
        self, batches: list[Tensor], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield model-ready ``(x, y)`` on ``device`` (``x`` in ``dtype``) for each index batch."""
        if self.tensors and self.images is not None and self.labels is not None:
            normalize = getattr(self.dataset, "normalize", None)
            for idx in batches:
                x = self.images[idx].to(device, non_blocking=True)
                y = self.labels[idx].to(device, non_blocking=True)
                x = normalize(x) if callable(normalize) else x
                yield x.to(dtype), y
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.dataset,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.num_workers,
        )
        for x, y in loader:
            x = x.to(device, non_blocking=True).to(dtype)
            yield x, torch.as_tensor(y).to(device, non_blocking=True)


# --------------------------------------------------------------------------- evaluation


def _forward_stats(info: Any) -> tuple[float, float, float]:
    """Sums over the batch of forward steps, relative residual and converged flags."""
    if info is None:
        return math.nan, math.nan, math.nan
    return (
        float(info.nstep.float().sum()),
        float(info.rel_residual.float().sum()),
        float(info.converged.float().sum()),
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
) -> int:
    """Precise BatchNorm: reset the running statistics and recompute them as the plain average
    over ``batches`` batches of ``dataset`` (first samples, fixed order) run in eval mode -- the
    eval solver's states, no dropout -- with only the BatchNorm layers in training mode. Every
    rank takes its shard of each batch, so synced BatchNorm layers see the global batch.
    Returns the number of batches used (0 when the model has no BatchNorm)."""
    dist_info = dist_info or DistInfo()
    net = _unwrap(model)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batches <= 0 or not norms:
        return 0
    was_training = net.training
    momenta = [m.momentum for m in norms]
    source = _Batches(dataset, num_workers)
    n = min(len(source), batches * batch_size)
    order = torch.arange(n)
    chunks = [
        order[i : i + batch_size][dist_info.rank :: dist_info.world_size]
        for i in range(0, n, batch_size)
    ]
    chunks = [c for c in chunks if c.numel() > 0]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
        m.train()
    try:
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
        for x, _ in source.iterate(chunks, torch.device(device), dtype):
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
) -> dict[str, float]:
    """Accuracy, loss and forward-solver statistics (mean steps, mean relative residual, share
    of converged samples) of ``model`` in eval mode (the eval solver) on ``dataset``."""
    dist_info = dist_info or DistInfo()
    device = torch.device(device)
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    source = _Batches(dataset, num_workers)
    order = torch.arange(len(source))
    batches = [
        order[i : i + batch_size][dist_info.rank :: dist_info.world_size]
        for i in range(0, len(source), batch_size)
    ]
    batches = [b for b in batches if b.numel() > 0]
    sums = torch.zeros(6, dtype=torch.float64)
    try:
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
        for x, y in source.iterate(batches, device, dtype):
            out = net(x)
            sums[0] += float(F.cross_entropy(out.logits, y, reduction="sum"))
            sums[1] += float((out.logits.argmax(1) == y).sum())
            sums[2] += y.numel()
            nstep, res, conv = _forward_stats(out.info)
            sums[3] += nstep
            sums[4] += res
            sums[5] += conv
    finally:
        net.train(was_training)
    sums = all_reduce_sum(sums, dist_info)
    n = max(float(sums[2]), 1.0)
    return {
        "test_loss": float(sums[0]) / n,
        "test_acc": float(sums[1]) / n,
        "test_fwd_nstep": float(sums[3]) / n,
        "test_fwd_residual": float(sums[4]) / n,
        "test_fwd_converged": float(sums[5]) / n,
        "test_n": float(sums[2]),
    }


# --------------------------------------------------------------------------- trainer


def _resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
        if name == "cuda":
            return torch.device(
                "cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device()
            )
    return torch.device(name)


class Trainer:
    """One training run of ``config`` writing into ``out_dir``.

    Files in ``out_dir`` (rank 0 only): ``config.yaml`` (resolved config), ``metrics.jsonl``,
    ``tensorboard/`` (when installed), ``last.pt`` (every epoch), ``best.pt`` (best test
    accuracy) and ``curves.png``. With ``resume=True`` training continues from ``last.pt``.
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        config.validate()
        self.config = config
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.progress = progress and config.log.progress
        self.model: nn.Module | None = None

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.config
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        wanted = cfg.train.device
        device_type = (
            "cuda"
            if wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        self.dist = init_distributed(device_type)
        self.device = _resolve_device(wanted, self.dist)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

        train_ds, test_ds, info = _load_data(cfg)
        self.train_data = _Batches(train_ds, cfg.data.num_workers)
        self.test_ds = test_ds
        self.num_classes = int(_info_get(info, "num_classes"))
        self.in_channels = int(_info_get(info, "in_channels"))

        seed = cfg.train.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.dtype = getattr(torch, cfg.train.dtype)
        model = _build_model(cfg, self.num_classes, self.in_channels).to(self.device, self.dtype)
        self.net = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if cfg.train.sync_bn:
                model = convert_batchnorm(model, self.device.type)
                self.net = model

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = len(
            shard_batches(
                torch.arange(len(self.train_data)),
                cfg.data.batch_size,
                self.dist,
                drop_last=cfg.data.drop_last,
            )
        )
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size: {cfg.data.batch_size} is larger than the training set "
                f"({len(self.train_data)} samples) with drop_last; lower it or set data.drop_last: false"
            )
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        o = cfg.optim
        self.schedule = LRSchedule(
            self.optimizer,
            base_lr=o.lr,
            total_steps=self.total_steps,
            warmup_steps=o.warmup_steps,
            min_lr=o.min_lr,
            kind=o.schedule,
        )
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimiser steps
        self.best_acc = -1.0
        self.elapsed = 0.0
        self.train_time = 0.0
        self.last_eval: dict[str, float] = {}
        if self.resume:
            self._load_resume()
        if self.dist.is_main:
            dump_config(cfg, self.out_dir / "config.yaml")
        self.monitor = None
        if cfg.train.monitor_every > 0:
            from phantomdeq.grad import IFT

            from .monitor import GradientMonitor

            self.monitor = GradientMonitor(
                IFT(build_solver(cfg.train.monitor_solver)), params=cfg.train.monitor_params
            )
        self.logger = MetricsLogger(
            self.out_dir,
            enabled=self.dist.is_main,
            tensorboard=cfg.log.tensorboard,
            append=self.resume,
        )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        params = [p for p in self.net.parameters() if p.requires_grad]
        if o.name == "sgd":
            return torch.optim.SGD(
                params,
                lr=o.lr,
                momentum=o.momentum,
                nesterov=o.nesterov,
                weight_decay=o.weight_decay,
            )
        return torch.optim.Adam(
            params, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, weight_decay=o.weight_decay
        )

    def _load_resume(self) -> None:
        path = self.out_dir / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"cannot resume: checkpoint {str(path)!r} not found")
        state = load_checkpoint(path, map_location=self.device)
        saved = config_from_dict(state["config"])
        differ = _config_differences(saved, self.config)
        if differ:
            raise ConfigError(
                f"cannot resume from {str(path)!r}: the config differs from the checkpoint's in "
                f"{', '.join(differ)} (only log.*, train.device and train.monitor_* may change on resume)"
            )
        try:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match the model: {exc}"
            ) from exc
        self.schedule.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_acc = float(state.get("best_acc", -1.0))
        self.elapsed = float(state.get("time_s", 0.0))
        self.train_time = float(state.get("train_time_s", 0.0))
        self.last_eval = dict(state.get("last_eval", {}))
        if self.dist.is_main:
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.epoch, self.step)

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "rng": capture_rng_state(),
            "config": config_to_dict(self.config),
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best_acc,
            "time_s": self.elapsed,
            "train_time_s": self.train_time,
            "last_eval": self.last_eval,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
        }

    # ------------------------------------------------------------------ training
    def _fail(self, what: str, epoch: int) -> TrainingError:
        last = self.out_dir / "last.pt"
        where = (
            f"the last good checkpoint is {str(last)!r} (after epoch {self.epoch})"
            if last.is_file() and self.epoch > 0
            else "no checkpoint was written yet"
        )
        return TrainingError(
            f"{what} at epoch {epoch + 1}, step {self.step + 1}; training stopped, {where}. "
            f"Try a lower optim.lr, optim.grad_clip > 0, more solver.max_iter or pretraining."
        )

    def _train_step(self, x: Tensor, y: Tensor, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        from phantomdeq import DEQError

        cfg = self.config
        assert self.model is not None
        model = self.model
        model.train()
        gen = torch.Generator(device=x.device)
        gen.manual_seed(_seed_of(cfg.train.seed, epoch, step_in_epoch, self.dist.rank))
        if cfg.data.augment:
            x = _augment(x, cfg, gen)
        pretrain = self.step < cfg.train.pretrain_steps
        use_jac = (
            not pretrain
            and cfg.train.jac_reg_weight > 0
            and self.step % cfg.train.jac_reg_every == 0
        )
        monitor_rec: dict[str, float] = {}
        if self.monitor is not None and not pretrain and self.step % cfg.train.monitor_every == 0:
            monitor_rec = self._measure_gradient(x, y, gen)
        error = ""
        loss = torch.zeros((), device=self.device)
        ce = loss
        jac_loss: Tensor | None = None
        info = None
        correct = 0.0
        try:
            if pretrain:
                out = model(
                    x, mode="unrolled", unrolled_steps=cfg.train.unrolled_steps, generator=gen
                )
            else:
                out = model(x, mode="deq", jac_reg=use_jac, generator=gen)
            ce = F.cross_entropy(out.logits, y, label_smoothing=cfg.train.label_smoothing)
            loss = ce
            if use_jac and out.jac_loss is not None:
                jac_loss = out.jac_loss
                loss = loss + cfg.train.jac_reg_weight * jac_loss
            info = out.info
            correct = float((out.logits.detach().argmax(1) == y).sum())
        except DEQError as exc:
            error = f"non-finite DEQ state ({exc})"
        n = float(y.numel())
        nstep, res, conv = _forward_stats(info)
        finite = 1.0 if (not error and bool(torch.isfinite(loss.detach()))) else 0.0
        stats = torch.tensor(
            [float(ce.detach()) * n, correct, n, nstep, res, conv, finite, 1.0], dtype=torch.float64
        )
        stats = all_reduce_sum(stats, self.dist)
        if float(stats[6]) < float(stats[7]):
            raise self._fail(error or f"non-finite loss ({float(loss.detach())})", epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.optim.grad_clip)
        lr = self.schedule.set_step(self.step)
        self.optimizer.step()
        self.step += 1
        total = max(float(stats[2]), 1.0)
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.step,
            "stage": "unrolled" if pretrain else "deq",
            "lr": lr,
            "train_loss": float(stats[0]) / total,
            "train_acc": float(stats[1]) / total,
            "fwd_nstep": float(stats[3]) / total,
            "fwd_residual": float(stats[4]) / total,
            "fwd_converged": float(stats[5]) / total,
            "n": total,
        }
        if jac_loss is not None:
            rec["jac_loss"] = float(jac_loss.detach())
        rec.update(monitor_rec)
        return rec

    def _measure_gradient(self, x: Tensor, y: Tensor, gen: torch.Generator) -> dict[str, float]:
        """The gradient-quality monitor on this step's batch (before the update, same dropout
        mask: ``gen`` is restored afterwards). A failed exact solve is logged, never raised."""
        from phantomdeq import DEQError

        assert self.monitor is not None
        t0 = time.perf_counter()
        try:
            res = self.monitor.measure_classifier(
                self.net, x, y, generator=gen, label_smoothing=self.config.train.label_smoothing
            )
        except DEQError:
            return {
                "monitor_cos": math.nan,
                "monitor_norm_ratio": math.nan,
                "monitor_time_s": time.perf_counter() - t0,
            }
        out = {
            "monitor_cos": res["cosine"],
            "monitor_norm_ratio": res["norm_ratio"],
            "monitor_time_s": res["time_s"],
        }
        if "exact_bwd_residual" in res:
            out["monitor_exact_residual"] = res["exact_bwd_residual"]
        return out

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.config
        torch.manual_seed(_seed_of(cfg.train.seed, epoch, self.dist.rank, 1))
        order = epoch_permutation(len(self.train_data), cfg.train.seed, epoch)
        batches = shard_batches(order, cfg.data.batch_size, self.dist, drop_last=cfg.data.drop_last)
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(batches),
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )
        sums = {
            "loss": 0.0,
            "acc": 0.0,
            "n": 0.0,
            "nstep": 0.0,
            "res": 0.0,
            "conv": 0.0,
            "deq_n": 0.0,
            "monitor_time": 0.0,
        }
        t_epoch = time.perf_counter()
        elapsed0 = self.elapsed
        try:
            for i, (x, y) in enumerate(self.train_data.iterate(batches, self.device, self.dtype)):
                t0 = time.perf_counter()
                rec = self._train_step(x, y, epoch, i)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                # the gradient-quality monitor is reported separately, not as training time
                monitor_time = float(rec.get("monitor_time_s", 0.0))
                sums["monitor_time"] += monitor_time
                dt = time.perf_counter() - t0 - monitor_time
                self.train_time += dt
                rec["step_time_s"] = dt
                rec["time_s"] = elapsed0 + (time.perf_counter() - t_epoch)
                n = rec["n"]
                sums["loss"] += rec["train_loss"] * n
                sums["acc"] += rec["train_acc"] * n
                sums["n"] += n
                if rec["stage"] == "deq" and math.isfinite(rec["fwd_nstep"]):
                    sums["nstep"] += rec["fwd_nstep"] * n
                    sums["res"] += rec["fwd_residual"] * n
                    sums["conv"] += rec["fwd_converged"] * n
                    sums["deq_n"] += n
                if self.step % cfg.log.every == 0:
                    self.logger.log("step", rec)
                if bar is not None:
                    bar.update(1)
                    deq = rec["stage"] == "deq"
                    bar.set_postfix(
                        loss=f"{rec['train_loss']:.3f}",
                        acc=f"{rec['train_acc']:.3f}",
                        nstep=f"{rec['fwd_nstep']:.1f}" if deq else "unrolled",
                        res=f"{rec['fwd_residual']:.1e}" if deq else "-",
                        refresh=False,
                    )
        finally:
            if bar is not None:
                bar.close()
        n = max(sums["n"], 1.0)
        deq_n = sums["deq_n"]
        self.elapsed = elapsed0 + (time.perf_counter() - t_epoch)
        return {
            "train_loss": sums["loss"] / n,
            "train_acc": sums["acc"] / n,
            "fwd_nstep": sums["nstep"] / deq_n if deq_n else math.nan,
            "fwd_residual": sums["res"] / deq_n if deq_n else math.nan,
            "fwd_converged": sums["conv"] / deq_n if deq_n else math.nan,
            "epoch_time_s": time.perf_counter() - t_epoch - sums["monitor_time"],
            **({"monitor_time_s": sums["monitor_time"]} if self.monitor is not None else {}),
        }

    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (continuing a resumed run) and return the final metrics."""
        self._setup()
        cfg = self.config
        try:
            if self.dist.is_main and self.epoch >= cfg.train.epochs:
                print(
                    f"phantomdeq: run in {str(self.out_dir)!r} already finished "
                    f"({self.epoch} epochs)",
                    file=sys.stderr,
                )
            while self.epoch < cfg.train.epochs:
                epoch = self.epoch
                t_start = time.perf_counter()
                train_rec = self._train_epoch(epoch)
                last = epoch + 1 == cfg.train.epochs
                eval_rec: dict[str, float] = {}
                if (epoch + 1) % cfg.train.eval_every == 0 or last:
                    t_eval = time.perf_counter()
                    recalibrate_batchnorm(
                        self.net,
                        self.train_data.dataset,
                        batches=cfg.train.bn_recalibration_batches,
                        batch_size=cfg.data.batch_size,
                        device=self.device,
                        dist_info=self.dist,
                        num_workers=cfg.data.num_workers,
                    )
                    eval_rec = evaluate(
                        self.net,
                        self.test_ds,
                        batch_size=cfg.data.eval_batch_size,
                        device=self.device,
                        dist_info=self.dist,
                        num_workers=cfg.data.num_workers,
                    )
                    eval_rec["eval_time_s"] = time.perf_counter() - t_eval
                    self.elapsed += eval_rec["eval_time_s"]
                    self.last_eval = dict(eval_rec)
                self.epoch = epoch + 1
                steps_done = self.steps_per_epoch
                rec = {
                    "epoch": self.epoch,
                    "step": self.step,
                    **train_rec,
                    **eval_rec,
                    "time_s": self.elapsed,
                    "time_per_step_s": train_rec["epoch_time_s"] / max(steps_done, 1),
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
                improved = bool(eval_rec) and eval_rec["test_acc"] > self.best_acc
                if improved:
                    self.best_acc = eval_rec["test_acc"]
                rec["best_test_acc"] = self.best_acc
                self.logger.log("epoch", rec)
                if self.dist.is_main:
                    state = self._checkpoint_state()
                    save_checkpoint(self.out_dir / "last.pt", state)
                    if improved:
                        save_checkpoint(self.out_dir / "best.pt", state)
                    self._report(rec, time.perf_counter() - t_start)
                barrier(self.dist)
        finally:
            self.logger.close()
            if (
                self.dist.is_main
                and self.config.log.plot
                and (self.out_dir / "metrics.jsonl").is_file()
            ):
                try:
                    plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
                except Exception as exc:  # a plot must never hide the training outcome
                    print(f"phantomdeq: could not draw curves.png: {exc}", file=sys.stderr)
            cleanup(self.dist)
        return self._final_metrics()

    def _report(self, rec: dict[str, Any], seconds: float) -> None:
        if not self.progress:
            return
        parts = [
            f"epoch {rec['epoch']}/{self.config.train.epochs}",
            f"loss {rec['train_loss']:.4f}",
        ]
        if "test_acc" in rec:
            parts.append(f"test acc {100 * rec['test_acc']:.2f}%")
            parts.append(f"fwd steps {rec['test_fwd_nstep']:.1f}")
            parts.append(f"res {rec['test_fwd_residual']:.2e}")
        parts.append(f"{seconds:.1f}s")
        print("  ".join(parts), file=sys.stderr)

    def _final_metrics(self) -> dict[str, Any]:
        ev = self.last_eval
        fwd_nstep = math.nan
        path = self.out_dir / "metrics.jsonl"
        if self.dist.is_main and path.is_file():
            rows = [
                r for r in read_metrics(path) if r.get("kind") == "step" and r.get("stage") == "deq"
            ]
            vals = [r["fwd_nstep"] for r in rows if isinstance(r.get("fwd_nstep"), int | float)]
            if vals:
                fwd_nstep = float(np.mean(vals))
        return {
            "test_acc": ev.get("test_acc", math.nan),
            "best_test_acc": self.best_acc if self.best_acc >= 0 else math.nan,
            "test_loss": ev.get("test_loss", math.nan),
            "test_fwd_nstep": ev.get("test_fwd_nstep", math.nan),
            "test_fwd_residual": ev.get("test_fwd_residual", math.nan),
            "test_fwd_converged": ev.get("test_fwd_converged", math.nan),
            "fwd_nstep": fwd_nstep,
            "epochs": self.epoch,
            "steps": self.step,
            "time_s": self.elapsed,
            "time_per_step_s": self.train_time / max(self.step, 1),
            "out_dir": str(self.out_dir),
        }


def _config_differences(a: Config, b: Config) -> list[str]:
    da, db = config_to_dict(a), config_to_dict(b)
    out: list[str] = []
    for section in da:
        if section == "log":
            continue
        sa, sb = da[section], db[section]
        if isinstance(sa, dict) and isinstance(sb, dict):
            for key in sa:
                if section == "train" and (key == "device" or key.startswith("monitor_")):
                    continue
                if sa[key] != sb.get(key):
                    out.append(f"{section}.{key}")
        elif sa != sb:
            out.append(section)
    return out


def _truncate_metrics(path: Path, epoch: int, step: int) -> None:
    """Drop records written after the checkpoint being resumed from."""
    if not path.is_file():
        return
    import json

    keep = [
        r
        for r in read_metrics(path)
        if int(r.get("step", 0)) <= step and int(r.get("epoch", 0)) <= epoch
    ]

    path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")


def run_training(
    config: Config | dict[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a model and return its final metrics.

    ``config`` is a :class:`Config`, a raw mapping or a YAML path. The result holds
    ``test_acc`` (last evaluation), ``best_test_acc``, ``test_loss``, ``test_fwd_nstep``,
    ``test_fwd_residual``, ``test_fwd_converged``, ``fwd_nstep`` (mean training forward steps),
    ``epochs``, ``steps``, ``time_s`` (training + evaluation wall time) and ``time_per_step_s``.
    """
    if isinstance(config, str | Path):
        cfg = load_config(config)
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    elif isinstance(config, Config):
        cfg = config
    else:
        raise TypeError(
            f"run_training: config must be a Config, a mapping or a path, got {type(config).__name__}"
        )
    return Trainer(cfg, out_dir, resume=resume, progress=progress).fit()
