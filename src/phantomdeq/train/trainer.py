"""The training loop for image classifiers built on DEQ models (MDEQ).

One :class:`Trainer` run: load the data set, build the model with the configured forward
solvers and gradient estimator (paper Sec. 2: IFT eq. 4, UPG eq. 17, NPG eq. 18, ...), then for
each epoch iterate over a deterministic per-epoch order, optionally starting with the MDEQ
unrolled pre-training stage, evaluate, log and checkpoint.

Reproducibility: the global sample order of an epoch depends only on ``(seed, epoch)``; the
generator that drives augmentation and the variational-dropout masks of each step is seeded
from ``(seed, epoch, batch index, rank)``; the global torch RNG (anything else random, e.g. the
Hutchinson probes of the Jacobian regulariser) is re-seeded from ``(seed, epoch, rank)`` at the
start of every epoch. Checkpoints (at epoch ends, every ``train.checkpoint_every_steps`` steps
and on SIGINT/SIGTERM) carry the position (epoch, batch, step), the RNG states, the optimiser
and schedule states, the partial epoch statistics and :attr:`Trainer.extra_state`; resuming
skips the batches already done in the epoch's order and restores the RNG states instead of
re-seeding. Hence a run interrupted at any checkpoint and resumed with ``resume=True`` makes
the same updates as an uninterrupted one (bit for bit on CPU).

Reliability (see :mod:`.guard`, :mod:`.run_dir`, :mod:`.checkpoint`, :mod:`.stop_signals`):
a folder holding a run is refused without ``resume`` or ``overwrite``; the loss and the gradient
norm are checked before every ``optimizer.step`` and parameters and buffers before every save
(``train.on_nonfinite``: stop or skip); precise-BN recalibration and evaluation failures and a
final accuracy at chance with a risen loss are reported as a divergence naming the step and
the last (finite) checkpoint.

The pieces around the loop live in their own modules: building from the config
(:mod:`.build`), batches, seeds and augmentation (:mod:`.batches`), the learning-rate schedule
(:mod:`.schedule`), evaluation and precise BatchNorm (:mod:`.evaluation`), processes and
collectives (:mod:`.distributed`), mixed precision -- autocast and the fp16 gradient scaler --
(:mod:`.precision`), checkpoints (:mod:`.checkpoint`) and metrics files (:mod:`.metrics_log`).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phantomdeq.errors import DEQError

from .batches import Batches, augment, seed_of
from .build import (
    build_model,
    build_solver,
    info_get,
    load_data,
    make_optimizer,
    prepare_data,
    resolve_device,
)
from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import (
    RESUMABLE_TRAIN_KEYS,
    Config,
    ConfigError,
    config_differences,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from .distributed import (
    all_reduce_sum,
    barrier,
    cleanup,
    convert_batchnorm,
    epoch_permutation,
    init_distributed,
    rank0_first,
    shard_batches,
)
from .evaluation import evaluate, forward_stats, recalibrate_batchnorm
from .guard import BufferSnapshot, chance_divergence, grad_norm, nonfinite_entries
from .metrics_log import MetricsLogger, plot_curves, read_metrics, truncate_metrics
from .model_state import check_finite_weights, load_model_weights
from .precision import MixedPrecision, check_precision
from .run_dir import RunFolder, RunFolderError, prepare_run_folder
from .schedule import LRSchedule, replan_note
from .stop_signals import StopSignals, TrainingInterrupted

__all__ = ["Trainer", "TrainingError", "TrainingInterrupted", "run_training"]


class TrainingError(RuntimeError):
    """Training diverged or cannot continue (non-finite loss, gradient or state, accuracy at
    chance with a risen loss); the message names the step and the last finite checkpoint."""


def _fresh_sums() -> dict[str, float]:
    """Accumulators of one epoch's training statistics (checkpointed mid-epoch)."""
    return {
        "loss": 0.0,
        "acc": 0.0,
        "n": 0.0,
        "nstep": 0.0,
        "res": 0.0,
        "conv": 0.0,
        "deq_n": 0.0,
        "monitor_time": 0.0,
        "skipped": 0.0,
        "scaler_skipped": 0.0,
    }


class Trainer:
    """One training run of ``config`` writing into ``out_dir``.

    Files in ``out_dir`` (rank 0 only): ``config.yaml`` (resolved config), ``metrics.jsonl``,
    ``tensorboard/`` (when installed), ``last.pt`` (every epoch, every
    ``train.checkpoint_every_steps`` steps and on SIGINT/SIGTERM), ``best.pt`` (best test
    accuracy) and ``curves.png``. A folder that already holds a run is refused unless
    ``resume=True`` (continue from ``last.pt``; a folder without a checkpoint yet starts from the
    beginning) or ``overwrite=True`` (delete the old run's files and start afresh).
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        config.validate()
        self.config = config
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress and config.log.progress
        self.model: nn.Module | None = None
        #: Hook for more training state: objects with ``state_dict()`` / ``load_state_dict()``
        #: registered here under a name are saved in every checkpoint (under ``"extra"``) and
        #: restored on resume (e.g. ``self.extra_state["scaler"] = torch.amp.GradScaler()``).
        #: Register them in :meth:`_setup` before the checkpoint is loaded.
        self.extra_state: dict[str, Any] = {}
        self.run_folder: RunFolder | None = None
        self._stop = StopSignals(announce=False)
        self._saved_epochs = config.train.epochs  # the epoch count the resumed run was planned for

    # ------------------------------------------------------------------ setup
    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce under DDP)."""
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        return bool(float(all_reduce_sum(value, self.dist)[0]) > 0)

    def _prepare_folder(self) -> None:
        """Rank 0 checks and prepares the run folder; every rank learns the verdict."""
        problem: RunFolderError | None = None
        if self.dist.is_main:
            try:
                self.run_folder = prepare_run_folder(
                    self.out_dir, resume=self.resume, overwrite=self.overwrite
                )
            except RunFolderError as exc:
                problem = exc
        if self._any_rank(problem is not None):
            raise problem or RunFolderError(f"--out: rank 0 refused {str(self.out_dir)!r}")
        if self.run_folder is not None and self.run_folder.removed:
            print(
                f"phantomdeq: --overwrite: deleted the previous run's "
                f"{', '.join(self.run_folder.removed)} in {str(self.out_dir)!r}",
                file=sys.stderr,
            )

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
        self.device = resolve_device(wanted, self.dist)
        problem = check_precision(cfg.train.precision, cfg.train.dtype, self.device.type)
        if problem is not None:
            raise ConfigError(problem)
        self.amp = MixedPrecision(cfg.train.precision, self.device.type)
        if self.amp.scaling:  # fp16: the loss scale found so far is part of the training state
            self.extra_state["grad_scaler"] = self.amp.scaler
        self._prepare_folder()
        try:
            self._build()
        except BaseException:
            # a run that fails before training leaves no folder it created
            if self.run_folder is not None:
                self.run_folder.discard()
            raise

    def _build(self) -> None:
        cfg = self.config
        # rank 0 prepares (downloads) the data while the other ranks wait, then all load it
        rank0_first(lambda: prepare_data(cfg), self.dist)
        train_ds, test_ds, info = load_data(cfg)
        self.train_data = Batches(train_ds, cfg.data.num_workers)
        self.test_ds = test_ds
        self.num_classes = int(info_get(info, "num_classes"))
        self.in_channels = int(info_get(info, "in_channels"))

        seed = cfg.train.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.dtype = getattr(torch, cfg.train.dtype)
        model = build_model(cfg, self.num_classes, self.in_channels).to(self.device, self.dtype)
        if cfg.train.compile:  # train.compile (issue 13): in place, state_dict keys unchanged
            from .compile import compile_model

            compile_model(model)
        self.net = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if cfg.train.sync_bn:
                model = convert_batchnorm(model, self.device.type)
                self.net = model

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.optimizer = make_optimizer(self.net, cfg.optim)
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
        self.schedule = self._make_schedule(cfg.train.epochs)
        self.epoch = 0  # completed epochs
        self.batch = 0  # batches done in the current epoch (the next one is epoch + 1)
        self.step = 0  # completed optimiser steps (skipped steps are not counted)
        self.skipped = 0  # steps dropped by train.on_nonfinite: skip, in all
        self.consecutive_skips = 0
        self.epoch_sums = _fresh_sums()
        self.initial_loss: float | None = None  # training loss of the first step
        self.last_loss: tuple[int, float] | None = None  # (step, loss) of the last finite step
        self.last_checkpoint: tuple[int, int, int] | None = None  # (epoch, batch, step) of last.pt
        self.best_acc = -1.0
        self.elapsed = 0.0
        self.train_time = 0.0
        self.last_eval: dict[str, float] = {}
        resume_from = self.out_dir / "last.pt"
        if self.resume and resume_from.is_file():
            self._load_resume()
        elif self.resume:
            # killed before its first last.pt (best.pt may exist: a kill between the two writes)
            self._adopt_best()
            if self.dist.is_main:
                print(
                    f"phantomdeq: no checkpoint in {str(self.out_dir)!r} yet; starting the run "
                    f"from the beginning",
                    file=sys.stderr,
                )
                truncate_metrics(self.out_dir / "metrics.jsonl", 0, 0, 0)
        if self.dist.is_main:
            dump_config(cfg, self.out_dir / "config.yaml")
        self.monitor = None
        if cfg.train.monitor_every > 0:
            from phantomdeq.grad import IFT

            from .monitor import GradientMonitor

            self.monitor = GradientMonitor(
                IFT(solver=build_solver(cfg.train.monitor_solver)), params=cfg.train.monitor_params
            )
        self.logger = MetricsLogger(
            self.out_dir,
            enabled=self.dist.is_main,
            tensorboard=cfg.log.tensorboard,
            append=self.resume,
        )

    def _make_schedule(self, epochs: int) -> LRSchedule:
        o = self.config.optim
        return LRSchedule(
            self.optimizer,
            base_lr=o.lr,
            total_steps=self.steps_per_epoch * epochs,
            warmup_steps=o.warmup_steps,
            min_lr=o.min_lr,
            kind=o.schedule,
        )

    def _load_resume(self) -> None:
        cfg = self.config
        path = self.out_dir / "last.pt"
        state = load_checkpoint(path, map_location=self.device)
        saved = config_from_dict(state["config"])
        differ = [k for k in config_differences(saved, cfg) if k != "train.epochs"]
        if differ:
            allowed = ", ".join(f"train.{k}" for k in RESUMABLE_TRAIN_KEYS)
            raise ConfigError(
                f"cannot resume from {str(path)!r}: the config differs from the checkpoint's in "
                f"{', '.join(differ)} (only log.*, train.monitor_*, {allowed} and a larger "
                f"train.epochs may change on resume)"
            )
        epoch, batch = int(state["epoch"]), int(state.get("batch", 0))
        if cfg.train.epochs < epoch or (cfg.train.epochs == epoch and batch > 0):
            raise ConfigError(
                f"train.epochs: the run in {str(self.out_dir)!r} has already trained "
                f"{epoch} epoch(s){' and part of the next' if batch else ''}; to extend it, "
                f"set at least {epoch + (1 if batch else 0)}, got {cfg.train.epochs}"
            )
        load_model_weights(self.net, state["model"], source=str(path), stored=saved, requested=cfg)
        check_finite_weights(self.net, source=str(path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: the optimiser state does not match the model "
                f"({' '.join(str(exc).split())})"
            ) from exc
        extra = state.get("extra", {})
        for name, obj in self.extra_state.items():
            if name not in extra:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} has no saved {name!r} state; resume it with the "
                    f"settings it was written with"
                )
            obj.load_state_dict(extra[name])
        self.schedule.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.epoch, self.batch = epoch, batch
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.epoch_sums = {**_fresh_sums(), **dict(state.get("epoch_sums") or {})}
        initial = state.get("initial_loss")
        self.initial_loss = None if initial is None else float(initial)
        last = state.get("last_loss")
        self.last_loss = None if last is None else (int(last[0]), float(last[1]))
        self.best_acc = float(state.get("best_acc", -1.0))
        self.elapsed = float(state.get("time_s", 0.0))
        self.train_time = float(state.get("train_time_s", 0.0))
        self.last_eval = dict(state.get("last_eval", {}))
        self.last_checkpoint = (self.epoch, self.batch, self.step)
        self._saved_epochs = saved.train.epochs
        self._adopt_best()
        if self.dist.is_main:
            truncate_metrics(self.out_dir / "metrics.jsonl", self.epoch, self.step, self.batch)

    def _adopt_best(self) -> None:
        """Make ``best_acc`` the accuracy of the model in ``best.pt``: a kill between writing
        ``best.pt`` and ``last.pt`` leaves ``best.pt`` one epoch ahead (the checkpoint module's
        invariant); an unreadable ``best.pt`` is replaced at the next evaluation."""
        path = self.out_dir / "best.pt"
        if not path.is_file():
            return
        try:
            best = load_checkpoint(path, map_location="cpu")
        except CheckpointError as exc:
            if self.dist.is_main:
                print(f"phantomdeq: {exc}; it is replaced at the next evaluation", file=sys.stderr)
            self.best_acc = -1.0
            return
        self.best_acc = max(self.best_acc, float(best.get("best_acc", -1.0)))

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "rng": capture_rng_state(),
            "config": config_to_dict(self.config),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "skipped": self.skipped,
            "consecutive_skips": self.consecutive_skips,
            "epoch_sums": dict(self.epoch_sums),
            "initial_loss": self.initial_loss,
            "last_loss": None if self.last_loss is None else list(self.last_loss),
            "best_acc": self.best_acc,
            "time_s": self.elapsed,
            "train_time_s": self.train_time,
            "last_eval": self.last_eval,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "extra": {name: obj.state_dict() for name, obj in self.extra_state.items()},
        }

    def _save(self, *, best: bool, at: str) -> None:
        """Write ``best.pt`` (when ``best``) and then ``last.pt`` at the current position --
        only when every parameter and buffer is finite on every rank; otherwise the run has
        diverged and nothing is written."""
        bad = nonfinite_entries(self.net)
        if self._any_rank(bool(bad)):
            if bad:
                more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
                what = f"non-finite values in {bad[0]!r}{more}"
            else:
                what = "non-finite parameters or buffers on another rank"
            raise self._diverged(what, at)
        if self.dist.is_main:
            state = self._checkpoint_state()
            if best:  # best first: see the invariant in the checkpoint module
                save_checkpoint(self.out_dir / "best.pt", state)
            save_checkpoint(self.out_dir / "last.pt", state)
        self.last_checkpoint = (self.epoch, self.batch, self.step)
        barrier(self.dist)

    # ------------------------------------------------------------------ failures
    def _checkpoint_text(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        epoch, batch, step = self.last_checkpoint
        where = f"epoch {epoch}" if batch == 0 else f"epoch {epoch} + {batch} batches"
        return (
            f"the last (finite) checkpoint is {str(self.out_dir / 'last.pt')!r} "
            f"(after {where}, step {step})"
        )

    def _diverged(self, what: str, at: str) -> TrainingError:
        blowup = ""
        if self.initial_loss is not None and self.last_loss is not None:
            step, loss = self.last_loss
            if loss > 10.0 * max(self.initial_loss, 1e-12):
                blowup = (
                    f", after the training loss blew up from {self.initial_loss:.3g} (step 1) "
                    f"to {loss:.3g} (step {step})"
                )
        return TrainingError(
            f"training diverged: {what} {at}{blowup}; training stopped, "
            f"{self._checkpoint_text()}. Try a lower optim.lr, optim.grad_clip > 0, more "
            f"solver.max_iter, pretraining or train.on_nonfinite: skip."
        )

    def _interrupt(self, *, save: bool) -> TrainingInterrupted:
        """Stop on the signal every rank has agreed on; ``last.pt`` is written at the current
        position when ``save`` and the state is finite."""
        signum = self._stop.requested or int(signal.SIGTERM)
        epoch, batch = self.epoch, self.batch
        where = (
            f"after epoch {epoch} (step {self.step})"
            if batch == 0
            else f"in epoch {epoch + 1} after batch {batch} of {self.steps_per_epoch} "
            f"(step {self.step})"
        )
        if save:
            with contextlib.suppress(TrainingError):  # not finite: keep the previous checkpoint
                self._save(best=False, at=where)
        return TrainingInterrupted(signum, f"stopped {where}; {self._checkpoint_text()}")

    # ------------------------------------------------------------------ training
    def _skip_or_stop(
        self, what: str, epoch: int, snapshot: BufferSnapshot | None, base: dict[str, Any]
    ) -> dict[str, Any]:
        """A non-finite step: stop (``train.on_nonfinite: stop``) or drop it (``skip``): no
        optimiser or schedule step, BatchNorm buffers put back, gradients cleared."""
        cfg = self.config.train
        at = f"at epoch {epoch + 1}, step {self.step + 1}"
        if cfg.on_nonfinite == "stop" or snapshot is None:
            raise self._diverged(what, at)
        self.optimizer.zero_grad(set_to_none=True)
        snapshot.restore()
        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= cfg.max_skipped_steps:
            raise self._diverged(
                f"{self.consecutive_skips} consecutive steps skipped "
                f"(train.max_skipped_steps: {cfg.max_skipped_steps}), the last for {what}",
                at,
            )
        return {**base, "skipped": True, "skip_reason": what}

    def _train_step(self, x: Tensor, y: Tensor, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        cfg = self.config
        if self.model is None:
            raise RuntimeError("Trainer._train_step: call _setup() first")
        model = self.model
        model.train()
        gen = torch.Generator(device=x.device)
        gen.manual_seed(seed_of(cfg.train.seed, epoch, step_in_epoch, self.dist.rank))
        if cfg.data.augment:
            x = augment(x, cfg, gen)
        pretrain = self.step < cfg.train.pretrain_steps
        use_jac = (
            not pretrain
            and cfg.train.jac_reg_weight > 0
            and self.step % cfg.train.jac_reg_every == 0
        )
        monitor_rec: dict[str, float] = {}
        if self.monitor is not None and not pretrain and self.step % cfg.train.monitor_every == 0:
            monitor_rec = self._measure_gradient(x, y, gen)
        snapshot = BufferSnapshot(self.net) if cfg.train.on_nonfinite == "skip" else None
        error = ""
        loss = torch.zeros((), device=self.device)
        ce = loss
        jac_loss: Tensor | None = None
        info = None
        correct = 0.0
        try:
            with self.amp.autocast():
                if pretrain:
                    out = model(
                        x, mode="unrolled", unrolled_steps=cfg.train.unrolled_steps, generator=gen
                    )
                else:
                    out = model(x, mode="deq", jac_reg=use_jac, generator=gen)
            # the loss in fp32 whatever the compute precision of the logits
            ce = F.cross_entropy(out.logits.float(), y, label_smoothing=cfg.train.label_smoothing)
            loss = ce
            if use_jac and out.jac_loss is not None:
                jac_loss = out.jac_loss
                loss = loss + cfg.train.jac_reg_weight * jac_loss
            info = out.info
            correct = float((out.logits.detach().argmax(1) == y).sum())
        except DEQError as exc:
            error = f"non-finite DEQ state ({' '.join(str(exc).split())})"
        n = float(y.numel())
        nstep, res, conv = forward_stats(info)
        finite = 1.0 if (not error and bool(torch.isfinite(loss.detach()))) else 0.0
        stop = 1.0 if self._stop.requested else 0.0
        stats = torch.tensor(
            [float(ce.detach()) * n, correct, n, nstep, res, conv, finite, 1.0, stop],
            dtype=torch.float64,
        )
        stats = all_reduce_sum(stats, self.dist)
        total = max(float(stats[2]), 1.0)
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "batch": step_in_epoch + 1,
            "step": self.step,
            "stage": "unrolled" if pretrain else "deq",
            "stop": float(stats[8]) > 0,
            "train_loss": float(stats[0]) / total,
            "train_acc": float(stats[1]) / total,
            "fwd_nstep": float(stats[3]) / total,
            "fwd_residual": float(stats[4]) / total,
            "fwd_converged": float(stats[5]) / total,
            "n": total,
        }
        rec.update(monitor_rec)
        if float(stats[6]) < float(stats[7]):  # some rank's loss is not finite
            what = error or (
                f"non-finite loss ({float(loss.detach())})"
                if not finite
                else "non-finite loss on another rank"
            )
            return self._skip_or_stop(what, epoch, snapshot, rec)
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.backward(loss)
        self.amp.unscale_(self.optimizer)  # fp16: gradients in true units for guard and clipping
        params = [p for p in self.net.parameters() if p.requires_grad]
        norm = grad_norm(params)
        finite_grad = bool(torch.isfinite(norm))
        # fp16: an overflow of the *scaled* gradients is the GradScaler's business -- it skips
        # this update and lowers the scale, the normal way the scale is found, not a divergence
        # (counted as scaler_skipped; every rank sees the same all-reduced gradients)
        if not self.amp.scaling and self._any_rank(not finite_grad):
            what = f"non-finite gradient (norm {float(norm):.3g})"
            return self._skip_or_stop(what, epoch, snapshot, rec)
        if cfg.optim.grad_clip > 0 and finite_grad:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.grad_clip, norm)
        lr = self.schedule.set_step(self.step)
        applied = self.amp.step(self.optimizer)
        self.step += 1
        if self.amp.scaling:
            rec["grad_scale"] = self.amp.scale
            rec["scaler_skipped"] = 0 if applied else 1
        self.consecutive_skips = 0
        if self.initial_loss is None:
            self.initial_loss = rec["train_loss"]
        self.last_loss = (self.step, rec["train_loss"])
        rec["step"] = self.step
        rec["lr"] = lr
        if jac_loss is not None:
            rec["jac_loss"] = float(jac_loss.detach())
        return rec

    def _measure_gradient(self, x: Tensor, y: Tensor, gen: torch.Generator) -> dict[str, float]:
        """The gradient-quality monitor on this step's batch (before the update, same dropout
        mask: ``gen`` is restored afterwards). A failed exact solve is logged, never raised."""
        if self.monitor is None:
            return {}
        t0 = time.perf_counter()
        try:
            with self.amp.autocast():  # the gradient in use, in the run's compute precision
                res = self.monitor.measure_classifier(
                    self.net,
                    x,
                    y,
                    generator=gen,
                    label_smoothing=self.config.train.label_smoothing,
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
        """Train the remaining batches of ``epoch`` (all of them, or those after ``self.batch``
        when resuming mid-epoch) and return the epoch's training statistics."""
        cfg = self.config
        if self.batch == 0:  # a mid-epoch resume restored the RNG state instead
            torch.manual_seed(seed_of(cfg.train.seed, epoch, self.dist.rank, 1))
            self.epoch_sums = _fresh_sums()
        order = epoch_permutation(len(self.train_data), cfg.train.seed, epoch)
        batches = shard_batches(order, cfg.data.batch_size, self.dist, drop_last=cfg.data.drop_last)
        start = self.batch
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(batches),
                initial=start,
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )
        sums = self.epoch_sums
        every = cfg.train.checkpoint_every_steps
        t_epoch = time.perf_counter()
        elapsed0 = self.elapsed
        try:
            stream = self.train_data.iterate(
                batches[start:], self.device, self.dtype, epoch=epoch, seed=cfg.train.seed
            )
            for i, (x, y) in enumerate(stream, start):
                t0 = time.perf_counter()
                step_before = self.step
                rec = self._train_step(x, y, epoch, i)
                self.batch = i + 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                # the gradient-quality monitor is reported separately, not as training time
                monitor_time = float(rec.get("monitor_time_s", 0.0))
                sums["monitor_time"] += monitor_time
                dt = time.perf_counter() - t0 - monitor_time
                self.train_time += dt
                self.elapsed = elapsed0 + (time.perf_counter() - t_epoch)
                rec["step_time_s"] = dt
                rec["time_s"] = self.elapsed
                stop = bool(rec.pop("stop"))
                skipped = bool(rec.get("skipped", False))
                if skipped:
                    sums["skipped"] += 1
                else:
                    n = rec["n"]
                    sums["loss"] += rec["train_loss"] * n
                    sums["acc"] += rec["train_acc"] * n
                    sums["n"] += n
                    sums["scaler_skipped"] += float(rec.get("scaler_skipped", 0))
                    if rec["stage"] == "deq" and math.isfinite(rec["fwd_nstep"]):
                        sums["nstep"] += rec["fwd_nstep"] * n
                        sums["res"] += rec["fwd_residual"] * n
                        sums["conv"] += rec["fwd_converged"] * n
                        sums["deq_n"] += n
                if skipped or self.step % cfg.log.every == 0:
                    self.logger.log("step", rec)
                if bar is not None:
                    bar.update(1)
                    deq = rec["stage"] == "deq"
                    post = {
                        "loss": f"{rec['train_loss']:.3f}",
                        "acc": f"{rec['train_acc']:.3f}",
                        "nstep": f"{rec['fwd_nstep']:.1f}" if deq else "unrolled",
                        "res": f"{rec['fwd_residual']:.1e}" if deq else "-",
                    }
                    if self.skipped:
                        post["skipped"] = str(self.skipped)
                    bar.set_postfix(post, refresh=False)
                if stop:
                    raise self._interrupt(save=True)
                if (
                    every > 0
                    and self.step != step_before
                    and self.step % every == 0
                    and self.batch < len(batches)  # the epoch-end checkpoint follows
                ):
                    self._save(best=False, at=f"at epoch {epoch + 1}, step {self.step}")
        finally:
            if bar is not None:
                bar.close()
        self.batch = len(batches)
        n = max(sums["n"], 1.0)
        deq_n = sums["deq_n"]
        out = {
            "train_loss": sums["loss"] / n if sums["n"] else math.nan,
            "train_acc": sums["acc"] / n,
            "fwd_nstep": sums["nstep"] / deq_n if deq_n else math.nan,
            "fwd_residual": sums["res"] / deq_n if deq_n else math.nan,
            "fwd_converged": sums["conv"] / deq_n if deq_n else math.nan,
            "epoch_time_s": time.perf_counter() - t_epoch - sums["monitor_time"],
            **({"monitor_time_s": sums["monitor_time"]} if self.monitor is not None else {}),
            **({"scaler_skipped_steps": sums["scaler_skipped"]} if self.amp.scaling else {}),
        }
        if cfg.train.on_nonfinite == "skip":
            out["skipped_steps"] = int(sums["skipped"])
        return out

    def _evaluate(self, epoch: int) -> dict[str, float]:
        """Precise-BN recalibration and evaluation, inside the divergence guard."""
        cfg = self.config
        t_eval = time.perf_counter()
        at = f"after epoch {epoch + 1} (step {self.step})"
        stage = "precise-BN recalibration"
        try:
            recalibrate_batchnorm(
                self.net,
                self.train_data.dataset,
                batches=cfg.train.bn_recalibration_batches,
                batch_size=cfg.data.batch_size,
                device=self.device,
                dist_info=self.dist,
                num_workers=cfg.data.num_workers,
                precision=cfg.train.precision,
            )
            stage = "evaluation"
            eval_rec = evaluate(
                self.net,
                self.test_ds,
                batch_size=cfg.data.eval_batch_size,
                device=self.device,
                dist_info=self.dist,
                num_workers=cfg.data.num_workers,
                precision=cfg.train.precision,
            )
        except DEQError as exc:
            raise self._diverged(
                f"non-finite DEQ state in {stage} ({' '.join(str(exc).split())})", at
            ) from exc
        if not math.isfinite(eval_rec["test_loss"]):
            raise self._diverged(f"non-finite test loss ({eval_rec['test_loss']})", at)
        eval_rec["eval_time_s"] = time.perf_counter() - t_eval
        return eval_rec

    def _check_divergence(self, train_rec: dict[str, Any]) -> None:
        """After the last epoch: accuracy at chance with a blown-up loss is a divergence."""
        verdict = chance_divergence(
            accuracy=self.last_eval.get("test_acc", math.nan),
            n=int(self.last_eval.get("test_n", 0)),
            num_classes=self.num_classes,
            first_loss=self.initial_loss,
            last_loss=float(train_rec.get("train_loss", math.nan)),
        )
        if verdict:
            raise TrainingError(
                f"training diverged: after epoch {self.epoch} (step {self.step}) {verdict}; "
                f"the checkpoints in {str(self.out_dir)!r} hold a diverged model. Try a lower "
                f"optim.lr, optim.grad_clip > 0 or a warm-up (optim.warmup_steps)."
            )

    def _announce_resume(self) -> None:
        """One line when a resumed run's epoch count changed: how the schedule continues."""
        old, new = self._saved_epochs, self.config.train.epochs
        if old != new and self.dist.is_main:
            verb = "extending" if new > old else "shortening"
            how = replan_note(
                self.config.optim,
                self.steps_per_epoch,
                old_epochs=old,
                new_epochs=new,
                step=self.step,
            )
            print(
                f"phantomdeq: {verb} the run in {str(self.out_dir)!r} from {old} to {new} "
                f"epochs; {how}",
                file=sys.stderr,
            )

    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (continuing a resumed run) and return the final metrics.

        Setup, training and teardown share one ``try``/``finally``: whatever fails (a bad config
        found on a rank, a missing checkpoint, a diverged run, an interrupt), the metrics files
        are closed, the loader stopped and the process group left (:meth:`_teardown`)."""
        cfg = self.config
        with StopSignals() as stop:
            self._stop = stop
            try:
                self._setup()
                stop.announce = self.dist.is_main
                if self._any_rank(stop.requested != 0):  # a signal during the set-up
                    if self.run_folder is not None:
                        self.run_folder.discard()
                    raise TrainingInterrupted(
                        stop.requested or int(signal.SIGTERM), "stopped before training started"
                    )
                if self.dist.is_main and self.epoch >= cfg.train.epochs:
                    print(
                        f"phantomdeq: run in {str(self.out_dir)!r} already finished "
                        f"({self.epoch} epochs)",
                        file=sys.stderr,
                    )
                self._announce_resume()
                train_rec: dict[str, Any] | None = None
                while self.epoch < cfg.train.epochs:
                    epoch = self.epoch
                    t_start = time.perf_counter()
                    train_rec = self._train_epoch(epoch)
                    last = epoch + 1 == cfg.train.epochs
                    eval_rec: dict[str, float] = {}
                    if (epoch + 1) % cfg.train.eval_every == 0 or last:
                        eval_rec = self._evaluate(epoch)
                        self.elapsed += eval_rec["eval_time_s"]
                        self.last_eval = dict(eval_rec)
                    self.epoch = epoch + 1
                    self.batch = 0
                    rec = {
                        "epoch": self.epoch,
                        "step": self.step,
                        **train_rec,
                        **eval_rec,
                        "time_s": self.elapsed,
                        "time_per_step_s": train_rec["epoch_time_s"] / max(self.steps_per_epoch, 1),
                        "lr": self.optimizer.param_groups[0]["lr"],
                    }
                    improved = bool(eval_rec) and eval_rec["test_acc"] > self.best_acc
                    if improved:
                        self.best_acc = eval_rec["test_acc"]
                    rec["best_test_acc"] = self.best_acc
                    self.logger.log("epoch", rec)
                    self._save(best=improved, at=f"after epoch {self.epoch} (step {self.step})")
                    if self.dist.is_main:
                        self._report(rec, time.perf_counter() - t_start)
                    if self._any_rank(stop.requested != 0) and self.epoch < cfg.train.epochs:
                        raise self._interrupt(save=False)
                if train_rec is not None:
                    self._check_divergence(train_rec)
            except TrainingInterrupted as exc:
                if not exc.immediate or not hasattr(self, "last_checkpoint"):
                    raise
                # a second signal: say which checkpoint the run continues from
                raise TrainingInterrupted(
                    exc.signum, f"{exc}; {self._checkpoint_text()}", immediate=True
                ) from None
            finally:
                self._teardown()
        return self._final_metrics()

    def _teardown(self) -> None:
        """Close the metrics files, draw the curves (rank 0) and leave the process group.

        Leaving is more than ``destroy_process_group``: the gloo process group, and with it its
        native worker and TCP-loop threads, is freed only when nothing references it any more.
        The DDP wrapper does (it is dropped here; :func:`~.distributed.cleanup` then collects
        garbage), and so would ``torch.distributed.nn.functional`` had it been imported after
        the group was created (:func:`~.distributed.init_distributed` imports it first). A
        group still alive at exit is destroyed inside the interpreter's shutdown, where its
        threads can abort the process ("terminate called without an active exception")."""
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()
        train_data = getattr(self, "train_data", None)
        if train_data is not None:
            train_data.close()  # the loader's worker processes
        dist_info = getattr(self, "dist", None)
        if (
            dist_info is not None
            and dist_info.is_main
            and self.config.log.plot
            and (self.out_dir / "metrics.jsonl").is_file()
        ):
            try:
                plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
            except Exception as exc:  # a plot must never hide the training outcome
                print(f"phantomdeq: could not draw curves.png: {exc}", file=sys.stderr)
        if dist_info is not None:
            if self.model is not None and self.model is not getattr(self, "net", None):
                self.model = getattr(self, "net", None)  # drop the DDP wrapper
            cleanup(dist_info)

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
        if rec.get("skipped_steps"):
            parts.append(f"skipped {rec['skipped_steps']} steps")
        parts.append(f"{seconds:.1f}s")
        print("  ".join(parts), file=sys.stderr)

    def _final_metrics(self) -> dict[str, Any]:
        ev = self.last_eval
        fwd_nstep = math.nan
        path = self.out_dir / "metrics.jsonl"
        if self.dist.is_main and path.is_file():
            rows = [
                r
                for r in read_metrics(path)
                if r.get("kind") == "step" and r.get("stage") == "deq" and not r.get("skipped")
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
            "skipped_steps": self.skipped,
            "time_s": self.elapsed,
            "time_per_step_s": self.train_time / max(self.step, 1),
            "out_dir": str(self.out_dir),
        }


def run_training(
    config: Config | dict[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a model and return its final metrics.

    ``config`` is a :class:`Config`, a raw mapping or a YAML path. ``out_dir`` must not hold
    another run unless ``resume`` (continue it) or ``overwrite`` (replace it). The result holds
    ``test_acc`` (last evaluation), ``best_test_acc``, ``test_loss``, ``test_fwd_nstep``,
    ``test_fwd_residual``, ``test_fwd_converged``, ``fwd_nstep`` (mean training forward steps),
    ``epochs``, ``steps``, ``skipped_steps``, ``time_s`` (training + evaluation wall time) and
    ``time_per_step_s``. Raises :class:`TrainingError` when training diverges and
    :class:`TrainingInterrupted` on SIGINT/SIGTERM (after writing a checkpoint).
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
    return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite, progress=progress).fit()
