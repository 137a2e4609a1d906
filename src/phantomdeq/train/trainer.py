"""The training loop for DEQ models (the MDEQ presets or any ``model.target``), top to bottom.

One :class:`Trainer` run: load the data set, build the model with the configured forward
solvers and gradient estimator (paper Sec. 2: IFT eq. 4, UPG eq. 17, NPG eq. 18, ...), then for
each epoch iterate over a deterministic per-epoch order, optionally starting with the MDEQ
unrolled pre-training stage, evaluate, log and checkpoint. The loop calls the model through
:class:`~.build.ModelCall` (the forward options it declares, its output read as predictions
plus the DEQ's info) and knows no loss or metric by name: the run's :class:`~.tasks.Task`
computes them and names the metric that selects ``best.pt``.

Read it in this order: :meth:`Trainer.fit` (set up, the epochs, tear down),
:meth:`Trainer._epoch` (train, evaluate, log, checkpoint), :meth:`Trainer._train_epoch` (the
batches of one epoch), :meth:`Trainer._train_step` (forward, loss, backward, update), then the
set-up, the checkpoints and the failure policy. Each cross-cutting concern is one module, called
at named points of the loop:

=====================  =========================================================================
concern                called at
=====================  =========================================================================
precision              ``_setup`` builds ``self.amp`` (:mod:`.precision`); ``_forward`` and
                       ``_measure_gradient`` run under ``amp.autocast()``; ``_update`` calls
                       ``amp.backward / unscale_ / step``; ``_evaluate`` passes
                       ``train.precision`` on
warm start             ``_build`` makes the store (:mod:`.warm_start`); ``_forward`` reads the
                       batch's ``z0`` from it and puts the new equilibria back
run folder + resume    ``_prepare_folder``, ``_resume`` and ``_save`` (:mod:`.run_folder`)
distributed            ``_setup`` / ``_teardown`` join and leave the process group; batches are
                       sharded in ``_train_epoch``, statistics and verdicts all-reduced
                       (``_step_record``, ``_any_rank``) (:mod:`.distributed`)
monitor                ``_train_step`` calls ``_measure_gradient`` every
                       ``train.monitor_every`` steps (:mod:`.monitor`)
guard                  ``_train_step`` / ``_update`` check the loss and gradient, ``_save`` the
                       weights; ``_skip_or_stop`` and ``_diverged`` (:mod:`.guard`)
metrics                every step and epoch record goes to ``self.logger``; the bar, the epoch
                       line and ``curves.png`` (:mod:`.metrics`)
=====================  =========================================================================

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

Reliability (see :mod:`.guard` and :mod:`.run_folder`): a folder holding a run is refused
without ``resume`` or ``overwrite``; the loss and the gradient norm are checked before every
``optimizer.step`` and parameters and buffers before every save (``train.on_nonfinite``: stop
or skip); precise-BN recalibration and evaluation failures and a final accuracy at chance with
a risen loss are reported as a divergence naming the step and the last (finite) checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from phantomdeq import cpu_memory
from phantomdeq._state import as_tuple
from phantomdeq.data import DataError
from phantomdeq.errors import CorrectionError, DEQError

from .build import (
    LRSchedule,
    ModelCall,
    build_grad,
    build_model,
    build_solver,
    check_model,
    compile_model,
    info_fields,
    make_optimizer,
    replan_note,
    resolve_device,
)
from .config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    monitor_label,
)
from .data import (
    Batches,
    augment,
    evaluate,
    forward_stats,
    load_data,
    prepare_data,
    recalibrate_batchnorm,
)
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup,
    convert_batchnorm,
    epoch_permutation,
    init_distributed,
    rank0_first,
    seed_everything,
    seed_of,
    shard_batches,
)
from .guard import (
    BufferSnapshot,
    StopSignals,
    TrainingError,
    TrainingInterrupted,
    checkpoint_text,
    divergence_error,
    final_divergence_error,
    grad_norm,
    nonfinite_entries,
)
from .metrics import (
    MetricsLogger,
    add_to_sums,
    draw_run_curves,
    epoch_line,
    epoch_summary,
    fresh_sums,
    history_gap,
    mean_forward_steps,
    missing_output_notes,
    progress_bar,
    recorded_epochs,
    show_step,
    truncate_metrics,
)
from .monitor import GradientMonitor, monitor_record
from .precision import MixedPrecision, check_precision
from .run_folder import (
    ResumePoint,
    RunFolder,
    RunFolderError,
    adopt_best,
    capture_rng_state,
    check_resumable,
    check_saved_config,
    dump_config,
    prepare_run_folder,
    read_vocab,
    restore_objects,
    resume_point,
    saved_best,
    write_checkpoints,
    write_vocab,
)
from .tasks import Task, build_task
from .warm_start import WarmStartStore

__all__ = ["Trainer", "TrainingError", "TrainingInterrupted", "run_training"]


@dataclass
class _Forward:
    """One step's forward pass: the loss to minimise, the task's loss of the prediction (its
    part without correction and regulariser), the Jacobian regulariser (when used this step),
    the DEQ solve's info, the task's metric sums and, for a refused solve, why."""

    loss: Tensor
    ce: Tensor
    jac_loss: Tensor | None = None
    info: Any = None
    sums: dict[str, float] = field(default_factory=dict)
    error: str = ""


class Trainer:
    """One training run of ``config`` writing into ``out_dir``.

    Files in ``out_dir`` (rank 0 only): ``config.yaml`` (resolved config), ``metrics.jsonl``,
    ``tensorboard/`` (when installed), ``last.pt`` (every epoch, every
    ``train.checkpoint_every_steps`` steps and on SIGINT/SIGTERM), ``best.pt`` (the best
    evaluation of the task's primary metric: test accuracy for a classifier) and
    ``curves.png``. A folder that already holds a run is refused unless
    ``resume=True`` (continue from ``last.pt``; a folder without a checkpoint yet starts from the
    beginning) or ``overwrite=True`` (delete the old run's files and start afresh).

    Like the ``phantomdeq`` command, it keeps freed CPU memory in the process
    (:func:`phantomdeq.cpu_memory.retain_cpu_memory`) unless ``PHANTOMDEQ_CPU_MEMORY=system``.
    """

    # the run's options
    config: Config
    out_dir: Path
    resume: bool
    overwrite: bool
    progress: bool
    #: Hook for more training state: objects with ``state_dict()`` / ``load_state_dict()``
    #: registered here under a name are saved in every checkpoint (under ``"extra"``) and
    #: restored on resume (e.g. ``self.extra_state["scaler"] = torch.amp.GradScaler()``).
    #: Register them in ``_setup`` before the checkpoint is loaded.
    extra_state: dict[str, Any]
    run_folder: RunFolder | None
    # built from the config (in _setup)
    dist: DistInfo
    device: torch.device
    dtype: torch.dtype
    amp: MixedPrecision
    train_data: Batches
    test_ds: Any
    num_classes: int  # from the data set's description (0 when it has none)
    in_channels: int
    vocab: dict[str, Any] | None  # a language model's vocabulary (CharVocab.to_dict())
    task: Task  # the loss and the metrics (the config's task section)
    net: nn.Module  # the model (what checkpoints hold)
    model: nn.Module | None  # what the loop calls: ``net`` or its DDP wrapper
    call: ModelCall  # how the loop calls it (the forward options it takes, its output)
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    steps_per_epoch: int
    total_steps: int
    monitor: GradientMonitor | None
    logger: MetricsLogger
    warm_start: WarmStartStore | None  # train.warm_start: each sample's last equilibrium
    # where the run stands (checkpointed)
    epoch: int  # completed epochs
    batch: int  # batches done in the current epoch (the next one is epoch + 1)
    step: int  # completed optimiser steps (skipped steps are not counted)
    skipped: int  # steps dropped by train.on_nonfinite: skip, in all
    consecutive_skips: int
    epoch_sums: dict[str, float]
    initial_loss: float | None  # training loss of the first step
    last_loss: tuple[int, float] | None  # (step, loss) of the last finite step
    last_checkpoint: tuple[int, int, int] | None  # (epoch, batch, step) of last.pt
    best: float | None  # the best evaluation value of the task's primary metric so far
    elapsed: float
    train_time: float  # seconds in training steps (wall clock; no evaluation, no monitor)
    train_cpu: float  # CPU seconds of this process in training steps (all its threads)
    last_eval: dict[str, float]

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
        if cpu_memory.cpu_memory_from_env() == "retain":  # a bad value: ValueError naming it
            cpu_memory.retain_cpu_memory()
        self.config = config
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress and config.log.progress
        self.model = None
        self.extra_state = {}
        self.run_folder = None
        self._stop = StopSignals(announce=False)
        self._saved_epochs = config.train.epochs  # the epoch count a resumed run was planned for

    # --- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (continuing a resumed run) and return the final metrics.

        Setup, training and teardown share one ``try``/``finally``: whatever fails (a bad config
        found on a rank, a missing checkpoint, a diverged run, an interrupt), the metrics files
        are closed, the loader stopped and the process group left (:meth:`_teardown`)."""
        with StopSignals() as stop:
            self._stop = stop
            try:
                self._setup()  # processes, precision, run folder, data, model, resume point
                self._start()
                train_rec: dict[str, Any] | None = None
                while self.epoch < self.config.train.epochs:
                    train_rec = self._epoch()  # train, evaluate, log, checkpoint
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

    def _start(self) -> None:
        """After the set-up: stop on a signal that came during it, say when the run is
        already finished or its schedule re-planned."""
        stop = self._stop
        stop.announce = self.dist.is_main
        if self._any_rank(stop.requested != 0):  # a signal during the set-up
            if self.run_folder is not None:
                self.run_folder.discard()
            raise TrainingInterrupted(
                stop.requested or int(signal.SIGTERM), "stopped before training started"
            )
        if self.dist.is_main and self.epoch >= self.config.train.epochs:
            print(
                f"phantomdeq: run in {str(self.out_dir)!r} already finished ({self.epoch} epochs)",
                file=sys.stderr,
            )
        self._announce_resume()

    def _epoch(self) -> dict[str, Any]:
        """One epoch: train it, evaluate (every ``train.eval_every`` epochs and after the last),
        log its record, write the checkpoints, and stop here on a signal; returns its
        training statistics."""
        cfg = self.config
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
            "train_time_s": self.train_time,
            "train_cpu_s": self.train_cpu,
            "time_per_step_s": train_rec["epoch_time_s"] / max(self.steps_per_epoch, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        primary = f"test_{self.task.primary}"
        improved = bool(eval_rec) and self.task.better(eval_rec[primary], self.best)
        if improved:
            self.best = eval_rec[primary]
        rec[f"best_{primary}"] = math.nan if self.best is None else self.best
        self.logger.log("epoch", rec)
        self._save(best=improved, at=f"after epoch {self.epoch} (step {self.step})")
        if self.dist.is_main and self.progress:
            seconds = time.perf_counter() - t_start
            print(
                epoch_line(rec, cfg.train.epochs, self.task.describe(rec), seconds), file=sys.stderr
            )
        if self._any_rank(self._stop.requested != 0) and self.epoch < cfg.train.epochs:
            raise self._interrupt(save=False)
        return train_rec

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train the remaining batches of ``epoch`` (all of them, or those after ``self.batch``
        when resuming mid-epoch) and return the epoch's training statistics."""
        cfg = self.config
        if self.batch == 0:  # a mid-epoch resume restored the RNG state instead
            torch.manual_seed(seed_of(cfg.train.seed, epoch, self.dist.rank, 1))
            self.epoch_sums = fresh_sums()
        order = epoch_permutation(len(self.train_data), cfg.train.seed, epoch)
        batches = shard_batches(order, cfg.data.batch_size, self.dist, drop_last=cfg.data.drop_last)
        start, every = self.batch, cfg.train.checkpoint_every_steps
        bar = None
        if self.progress and self.dist.is_main:
            bar = progress_bar(epoch, cfg.train.epochs, len(batches), start)
        t_epoch, elapsed0 = time.perf_counter(), self.elapsed
        try:
            stream = self.train_data.iterate(
                batches[start:], self.device, self.dtype, epoch=epoch, seed=cfg.train.seed
            )
            for i, (x, y) in enumerate(stream, start):
                t0, step_before = time.perf_counter(), self.step
                c0 = time.process_time()
                rec = self._train_step(x, y, batches[i], epoch, i)
                self.batch = i + 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                # the gradient-quality monitor is reported separately, not as training time
                monitor_time = float(rec.get("monitor_time_s", 0.0))
                self.epoch_sums["monitor_time"] += monitor_time
                dt = time.perf_counter() - t0 - monitor_time
                self.train_time += dt
                # CPU time (a clock other processes on a shared machine barely disturb)
                self.train_cpu += max(time.process_time() - c0 - monitor_time, 0.0)
                self.elapsed = elapsed0 + (time.perf_counter() - t_epoch)
                rec["step_time_s"], rec["time_s"] = dt, self.elapsed
                rec["train_time_s"], rec["train_cpu_s"] = self.train_time, self.train_cpu
                rate = self.task.throughput
                if rate is not None and not rec.get("skipped", False) and dt > 0:
                    rec[rate] = rec["n"] / dt  # units (e.g. tokens) per second of this step
                stop = bool(rec.pop("stop"))
                add_to_sums(self.epoch_sums, rec, self.task.metric_names)
                if rec.get("skipped", False) or self.step % cfg.log.every == 0:
                    self.logger.log("step", rec)
                show_step(bar, rec, self.task.metric_names, self.skipped)
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
        return epoch_summary(
            self.epoch_sums,
            self.task.metric_names,
            time.perf_counter() - t_epoch,
            monitor=self.monitor is not None,
            scaling=self.amp.scaling,
            skipping=cfg.train.on_nonfinite == "skip",
        )

    def _train_step(
        self, x: Tensor, y: Tensor, indices: Tensor, epoch: int, step_in_epoch: int
    ) -> dict[str, Any]:
        """One training step on the batch ``(x, y)`` (the samples ``indices`` of the training
        set): its record for ``metrics.jsonl``."""
        cfg = self.config
        if self.model is None:
            raise RuntimeError("Trainer._train_step: call _setup() first")
        self.model.train()
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
        fwd = self._forward(self.model, x, y, indices, gen, pretrain=pretrain, use_jac=use_jac)
        finite = not fwd.error and bool(torch.isfinite(fwd.loss.detach()))
        rec, all_finite = self._step_record(fwd, y, epoch, step_in_epoch, pretrain, finite)
        rec.update(monitor_rec)
        if not all_finite:  # some rank's loss is not finite
            what = fwd.error or (
                f"non-finite loss ({float(fwd.loss.detach())})"
                if not finite
                else "non-finite loss on another rank"
            )
            return self._skip_or_stop(what, epoch, snapshot, rec)
        return self._update(fwd, rec, epoch, snapshot)

    def _forward(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        indices: Tensor,
        gen: torch.Generator,
        *,
        pretrain: bool,
        use_jac: bool,
    ) -> _Forward:
        """The forward pass and the loss (in fp32 whatever the compute precision); a DEQ solve
        refused for non-finite values is returned as ``error``, not raised. With
        ``train.warm_start`` the solve starts from the equilibria stored for ``indices``
        and stores the new ones."""
        cfg, task = self.config, self.task
        fwd = _Forward(
            loss=torch.zeros((), device=self.device),
            ce=torch.zeros((), device=self.device),
            sums=dict.fromkeys(task.metric_names, 0.0),
        )
        try:
            with self.amp.autocast():
                if pretrain:
                    steps = cfg.train.unrolled_steps
                    out = self.call(model, x, mode="unrolled", unrolled_steps=steps, generator=gen)
                else:
                    store = self.warm_start
                    z0 = (
                        None
                        if store is None
                        else store.get(indices, dtype=self.dtype, device=self.device)
                    )
                    out = self.call(model, x, mode="deq", jac_reg=use_jac, generator=gen, z0=z0)
                    if store is not None and out.info is not None:
                        store.put(indices, as_tuple(out.info.z))
            fwd.ce = task.loss(out.prediction, y)
            fwd.loss = fwd.ce
            if out.state_predictions is not None and out.state_weights is not None:
                # fixed-point correction: Σ_m γ^m loss(head(s_m)), the solution's loss weight 1
                for w, pred in zip(out.state_weights[:-1], out.state_predictions[:-1]):
                    fwd.loss = fwd.loss + w * task.loss(pred, y)
            if use_jac and out.jac_loss is not None:
                fwd.jac_loss = out.jac_loss
                fwd.loss = fwd.loss + cfg.train.jac_reg_weight * out.jac_loss
            fwd.info = out.info
            fwd.sums = task.metrics(out.prediction, y, loss=fwd.ce)
        except DEQError as exc:
            fwd.error = f"non-finite DEQ state ({' '.join(str(exc).split())})"
        except CorrectionError as exc:  # the config asks for states the solve does not visit
            raise ConfigError(
                f"grad.correction.states: {cfg.grad.correction.states} cannot be recorded at "
                f"step {self.step + 1}: {exc}; lower "
                f"grad.correction.states or the solver's tol"
            ) from exc
        return fwd

    def _step_record(
        self,
        fwd: _Forward,
        y: Tensor,
        epoch: int,
        step_in_epoch: int,
        pretrain: bool,
        finite: bool,
    ) -> tuple[dict[str, Any], bool]:
        """The step's statistics summed over ranks (one all-reduce, which also shares the
        stop request and the finiteness verdict), and whether every rank's loss is finite."""
        units = self.task.count(y)
        n = float(units)
        nstep, res, conv = forward_stats(fwd.info, units)
        stop = 1.0 if self._stop.requested else 0.0
        names = self.task.metric_names
        values = [fwd.sums[m] for m in names]
        stats = torch.tensor(
            [*values, n, nstep, res, conv, float(finite), 1.0, stop], dtype=torch.float64
        )
        stats = all_reduce_sum(stats, self.dist)
        n_total, nstep, res, conv, n_finite, ranks, stops = stats[len(names) :].tolist()
        total = max(n_total, 1.0)
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "batch": step_in_epoch + 1,
            "step": self.step,
            "stage": "unrolled" if pretrain else "deq",
            "stop": stops > 0,
            **{f"train_{m}": float(v) / total for m, v in zip(names, stats.tolist())},
            "fwd_nstep": nstep / total,
            "fwd_residual": res / total,
            "fwd_converged": conv / total,
            "n": total,
        }
        return rec, n_finite >= ranks

    def _update(
        self, fwd: _Forward, rec: dict[str, Any], epoch: int, snapshot: BufferSnapshot | None
    ) -> dict[str, Any]:
        """Backward, the gradient guard, clipping, the schedule and the optimiser step."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        backward_error = ""
        try:
            self.amp.backward(fwd.loss)
        except DEQError as exc:  # e.g. an IFT backward solve refused for non-finite values
            backward_error = f"non-finite backward solve ({' '.join(str(exc).split())})"
        if self._any_rank(bool(backward_error)):
            what = backward_error or "non-finite backward solve on another rank"
            return self._skip_or_stop(what, epoch, snapshot, rec)
        grad_k = _adaptive_k(self.net) if rec["stage"] == "deq" else None
        if grad_k is not None:
            rec["grad_k"] = grad_k
        self.amp.unscale_(self.optimizer)  # fp16: gradients in true units for guard and clipping
        params = [p for p in self.net.parameters() if p.requires_grad]
        norm = grad_norm(params)
        rec["grad_norm"] = float(norm)  # global norm before clipping (inf/nan kept as is)
        finite_grad = math.isfinite(rec["grad_norm"])
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
        if fwd.jac_loss is not None:
            rec["jac_loss"] = float(fwd.jac_loss.detach())
        return rec

    def _measure_gradient(self, x: Tensor, y: Tensor, gen: torch.Generator) -> dict[str, float]:
        """The gradient-quality monitor on this step's batch (before the update, same dropout
        mask: ``gen`` is restored afterwards), as ``monitor_*`` fields of the step's record."""
        if self.monitor is None:
            return {}
        net, task = self.net, self.task

        def loss() -> Tensor:
            return task.loss(self.call(net, x, mode="deq", generator=gen).prediction, y)

        with self.amp.autocast():  # the gradient in use, in the run's compute precision
            return monitor_record(self.monitor, net, loss, gen)

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
                task=self.task,
            )
        except DEQError as exc:
            raise self._diverged(
                f"non-finite DEQ state in {stage} ({' '.join(str(exc).split())})", at
            ) from exc
        except DataError as exc:  # a bad file: keep the trained epoch before stopping
            raise self._keep_trained_epoch(exc, stage) from exc
        if not math.isfinite(eval_rec["test_loss"]):
            raise self._diverged(f"non-finite test loss ({eval_rec['test_loss']})", at)
        eval_rec["eval_time_s"] = time.perf_counter() - t_eval
        return eval_rec

    # --- set-up and tear-down ------------------------------------------------------------------

    def _setup(self) -> None:
        """Processes and device, mixed precision, the run folder, then everything built from
        the config (called first by ``fit``, inside its ``try``)."""
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

    def _build(self) -> None:
        """Data, model, optimiser and schedule, the position to start from (a resumed
        checkpoint or the beginning), the gradient monitor and the metrics files."""
        cfg = self.config
        self._build_model_and_data()
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        o = cfg.optim
        self.schedule = LRSchedule(
            self.optimizer,
            base_lr=o.lr,
            total_steps=self.steps_per_epoch * cfg.train.epochs,
            warmup_steps=o.warmup_steps,
            min_lr=o.min_lr,
            kind=o.schedule,
        )
        self._start_position()
        if self.resume:  # last.pt, else best.pt, else the beginning, or refused
            self._resume()
        if self.dist.is_main:
            dump_config(cfg, self.out_dir / "config.yaml")
        self.monitor = None
        if cfg.train.monitor_every > 0:
            from phantomdeq.grad import IFT

            self.monitor = GradientMonitor(
                IFT(solver=build_solver(cfg.train.monitor_solver)),
                params=cfg.train.monitor_params,
                compare={monitor_label(g): build_grad(g) for g in cfg.train.monitor_compare},
            )
        self.logger = MetricsLogger(
            self.out_dir,
            enabled=self.dist.is_main,
            tensorboard=cfg.log.tensorboard,
            append=self.resume,
        )
        if self.dist.is_main:
            for note in missing_output_notes(
                tensorboard=cfg.log.tensorboard,
                tensorboard_works=self.logger.tensorboard_enabled,
                plot=cfg.log.plot,
            ):
                print(note, file=sys.stderr)

    def _build_model_and_data(self) -> None:
        """Data sets, the model (DDP-wrapped with several processes), the warm-start store,
        the optimiser and the epoch length."""
        cfg = self.config
        # rank 0 prepares (downloads) the data while the other ranks wait, then all load it
        rank0_first(lambda: prepare_data(cfg), self.dist)
        # a resumed language model must read its corpus with the vocabulary it was trained on
        saved_vocab = read_vocab(self.out_dir) if self.resume else None
        train_ds, test_ds, info = load_data(cfg, vocab=saved_vocab)
        to_dict = getattr(getattr(info, "vocab", None), "to_dict", None)
        self.vocab = to_dict() if callable(to_dict) else None
        if self.vocab is not None and saved_vocab is None and self.dist.is_main:
            write_vocab(self.out_dir, self.vocab)
        self.train_data = Batches(train_ds, cfg.data.num_workers)
        self.test_ds = test_ds
        fields = info_fields(info)
        self.num_classes = int(fields.get("num_classes", 0))
        self.in_channels = int(fields.get("in_channels", 0))
        self.task = build_task(cfg, info)

        seed_everything(cfg.train.seed)
        self.dtype = getattr(torch, cfg.train.dtype)
        model = build_model(cfg, info=info).to(self.device, self.dtype)
        self.call = ModelCall(model)
        check_model(cfg.train, cfg.model.resolved()[0], self.call, model)
        if cfg.train.compile:  # in place: parameter names and state_dict keys unchanged
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
        self.warm_start = None
        if cfg.train.warm_start:
            if self.dist.enabled:
                raise ConfigError(
                    "train.warm_start: needs a single process (each of the "
                    f"{self.dist.world_size} processes would keep only its own shard's states)"
                )
            self.warm_start = WarmStartStore(
                len(self.train_data),
                self.device,
                pinned=cfg.train.warm_start_memory == "pinned",
                announce=self.dist.is_main,
            )
            self.extra_state["warm_start"] = self.warm_start
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

    def _teardown(self) -> None:
        """Close the metrics files, draw the curves (rank 0) and leave the process group
        (called last by ``fit``, in its ``finally``).

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
        if dist_info is not None:
            if dist_info.is_main and self.config.log.plot:
                task = getattr(self, "task", None)
                draw_run_curves(self.out_dir, task.metric_names if task else ("loss", "acc"))
            if self.model is not None and self.model is not getattr(self, "net", None):
                self.model = getattr(self, "net", None)  # drop the DDP wrapper
            cleanup(dist_info)
        if self.run_folder is not None:
            self.run_folder.release()

    # --- where the run starts, and its checkpoints ---------------------------------------------

    def _start_position(self) -> None:
        """A run at its very beginning."""
        self.epoch = self.batch = self.step = self.skipped = self.consecutive_skips = 0
        self.epoch_sums = fresh_sums()
        self.initial_loss = None
        self.last_loss = None
        self.last_checkpoint = None
        self.best = None
        self.elapsed = self.train_time = self.train_cpu = 0.0
        self.last_eval = {}

    def _resume(self) -> None:
        """Continue from ``last.pt``, else ``best.pt``, else the beginning of a run killed
        before its first checkpoint (see :func:`~.run_folder.resume_point`); raises before
        anything in the folder changes when it cannot start without losing what it holds."""
        metrics = self.out_dir / "metrics.jsonl"
        point = resume_point(
            self.out_dir,
            device=self.device,
            history=lambda: recorded_epochs(metrics),
            note=self._note,
        )
        if point is None:  # killed before its first checkpoint: start again, same config
            check_saved_config(self.out_dir, self.config)
            self._adopt_best()
            self._note(
                f"no checkpoint in {str(self.out_dir)!r} yet; starting the run from the beginning"
            )
            if self.dist.is_main:
                truncate_metrics(metrics, 0, 0, 0)
            return
        self._restore(point)

    def _restore(self, point: ResumePoint) -> None:
        """The run as the checkpoint ``point`` left it: every object it holds, the RNG
        streams, the position and the statistics; ``metrics.jsonl`` cut back to it."""
        saved = check_resumable(point, self.config, self.out_dir)
        restore_objects(
            point,
            saved=saved,
            config=self.config,
            net=self.net,
            optimizer=self.optimizer,
            schedule=self.schedule,
            extra_state=self.extra_state,
        )
        state = point.state
        self.epoch, self.batch = int(state["epoch"]), int(state.get("batch", 0))
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.epoch_sums = {**fresh_sums(), **dict(state.get("epoch_sums") or {})}
        initial = state.get("initial_loss")
        self.initial_loss = None if initial is None else float(initial)
        last = state.get("last_loss")
        self.last_loss = None if last is None else (int(last[0]), float(last[1]))
        self.best = saved_best(state)
        self.elapsed = float(state.get("time_s", 0.0))
        self.train_time = float(state.get("train_time_s", 0.0))
        self.train_cpu = float(state.get("train_cpu_s", 0.0))
        self.last_eval = dict(state.get("last_eval", {}))
        self.last_checkpoint = (self.epoch, self.batch, self.step)
        self._saved_epochs = saved.train.epochs
        if point.path.name != "best.pt":
            self._adopt_best()
        if point.announce:
            self._note(point.announce)
        if self.dist.is_main:
            metrics = self.out_dir / "metrics.jsonl"
            kept = truncate_metrics(metrics, self.epoch, self.step, self.batch)
            gap = history_gap(kept, self.epoch, self.step)
            if gap:
                self._note(
                    f"{str(metrics)!r} {gap} (deleted or emptied since {point.path.name} was "
                    f"written?): the history up to epoch {self.epoch}, step {self.step} is "
                    f"lost; the run continues and records from here on"
                )

    def _adopt_best(self) -> None:
        """``best`` from ``best.pt`` when it is ahead (see :func:`~.run_folder.adopt_best`)."""
        self.best = adopt_best(
            self.out_dir,
            self.config,
            self.best,
            self.task.better,
            note=self._note,
            is_main=self.dist.is_main,
        )

    def _checkpoint_state(self) -> dict[str, Any]:
        """What ``last.pt`` / ``best.pt`` hold."""
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
            "best_metric": self.best,
            # as read before tasks: "best_acc" of a classifier, -1 before the first evaluation
            f"best_{self.task.primary}": -1.0 if self.best is None else self.best,
            "time_s": self.elapsed,
            "train_time_s": self.train_time,
            "train_cpu_s": self.train_cpu,
            "last_eval": self.last_eval,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "vocab": self.vocab,
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
            write_checkpoints(self.out_dir, self._checkpoint_state(), best=best)
        self.last_checkpoint = (self.epoch, self.batch, self.step)
        barrier(self.dist)

    def _keep_trained_epoch(self, exc: DataError, stage: str) -> DataError:
        """A data error in the evaluation (or precise-BN recalibration) after a trained epoch:
        write ``last.pt`` at the epoch's end before it is evaluated (``batch`` = every batch
        done), so that ``--resume`` goes straight to the evaluation once the file is fixed;
        returns the error to raise, saying so. Single process only (under DDP the other ranks
        are not at this point) and only with finite weights."""
        if self.dist.enabled:
            return exc
        where = f"at epoch {self.epoch + 1}, step {self.step}"
        try:
            self._save(best=False, at=where)
        except (TrainingError, OSError):  # not finite, or cannot write: the last one stays
            return exc
        return type(exc)(
            f"{exc}; the {stage} stopped, but epoch {self.epoch + 1}'s training is saved in "
            f"{str(self.out_dir / 'last.pt')!r}: fix or remove the file, then continue with "
            f"--resume"
        )

    # --- the failure policy --------------------------------------------------------------------

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce under DDP; a single process
        answers at once, without a tensor or a host sync)."""
        if not self.dist.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        return bool(float(all_reduce_sum(value, self.dist)[0]) > 0)

    def _checkpoint_text(self) -> str:
        return checkpoint_text(self.out_dir, self.last_checkpoint)

    def _diverged(self, what: str, at: str) -> TrainingError:
        return divergence_error(
            what,
            at,
            initial_loss=self.initial_loss,
            last_loss=self.last_loss,
            checkpoint=self._checkpoint_text(),
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

    def _check_divergence(self, train_rec: dict[str, Any]) -> None:
        """After the last epoch: the task's verdict (a classifier: accuracy at chance with a
        blown-up loss) on the last evaluation and the training loss."""
        verdict = self.task.divergence(
            self.last_eval, self.initial_loss, float(train_rec.get("train_loss", math.nan))
        )
        if verdict:
            raise final_divergence_error(verdict, self.epoch, self.step, self.out_dir)

    # --- what the run says -----------------------------------------------------------------------

    def _note(self, message: str) -> None:
        """A ``phantomdeq:`` note on stderr (rank 0)."""
        if self.dist.is_main:
            print(f"phantomdeq: {message}", file=sys.stderr)

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

    def _final_metrics(self) -> dict[str, Any]:
        """What :func:`run_training` returns."""
        ev = self.last_eval
        path = self.out_dir / "metrics.jsonl"
        fwd_nstep = mean_forward_steps(path) if self.dist.is_main else math.nan
        primary = f"test_{self.task.primary}"
        return {
            primary: ev.get(primary, math.nan),
            f"best_{primary}": math.nan if self.best is None else self.best,
            **{
                f"test_{m}": ev.get(f"test_{m}", math.nan)
                for m in self.task.metric_names
                if m != self.task.primary
            },
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


def _adaptive_k(net: nn.Module) -> int | None:
    """The number of phantom-gradient steps an adaptive estimator (``k="auto"``) chose in this
    step's forward/backward pass (this rank's), None for a fixed ``k``."""
    from phantomdeq.deq import DEQ

    deq = next((m for m in net.modules() if isinstance(m, DEQ)), None)
    est = getattr(deq, "grad", None)
    if not getattr(est, "adaptive", False):
        return None
    last = getattr(est, "last_k", None)
    return last if isinstance(last, int) else None


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
    the task's evaluation metrics (a classifier: ``test_acc`` of the last evaluation,
    ``best_test_acc``, ``test_loss``; in general ``test_<primary>``, ``best_test_<primary>``
    and ``test_<metric>``), ``test_fwd_nstep``,
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
