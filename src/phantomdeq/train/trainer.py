"""The training loop for DEQ models (the MDEQ presets or any ``model.target``).

One :class:`Trainer` run: load the data set, build the model with the configured forward
solvers and gradient estimator (paper Sec. 2: IFT eq. 4, UPG eq. 17, NPG eq. 18, ...), then for
each epoch iterate over a deterministic per-epoch order, optionally starting with the MDEQ
unrolled pre-training stage, evaluate, log and checkpoint. The loop calls the model through
:class:`~.build.ModelCall` (the forward options it declares, its output read as
predictions plus the DEQ's info) and knows no loss or metric by name: the run's
:class:`~.tasks.Task` computes them and names the metric that selects ``best.pt``.

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

Reliability (see :mod:`.guard`, :mod:`.run_folder`, :mod:`.run_folder`, :mod:`.guard`):
a folder holding a run is refused without ``resume`` or ``overwrite``; the loss and the gradient
norm are checked before every ``optimizer.step`` and parameters and buffers before every save
(``train.on_nonfinite``: stop or skip); precise-BN recalibration and evaluation failures and a
final accuracy at chance with a risen loss are reported as a divergence naming the step and
the last (finite) checkpoint.

This file is the loop, top to bottom: :meth:`Trainer.fit` (epochs, evaluation, epoch-end
checkpoints), :meth:`Trainer._train_epoch` (the batches of one epoch) and
:meth:`Trainer._train_step` (forward, loss, backward, update). The rest of a run lives in its
own modules: the state it carries (:mod:`.trainer_state`), set-up from the config
(:mod:`.setup`, :mod:`.build`), checkpoint state, save and resume (:mod:`.resume`,
:mod:`.run_folder`), the failure policy (:mod:`.failures`, :mod:`.guard`,
:mod:`.guard`), reporting (:mod:`.reporting`, :mod:`.metrics`), batches and
augmentation (:mod:`.data`), seeds (:mod:`.build`), the learning-rate schedule
(:mod:`.build`), evaluation and precise BatchNorm (:mod:`.data`), processes and
collectives (:mod:`.distributed`) and mixed precision (:mod:`.precision`).
"""

from __future__ import annotations

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
from phantomdeq.errors import DEQError

from .config import Config, config_from_dict, load_config
from .data import augment, evaluate, forward_stats, recalibrate_batchnorm
from .distributed import all_reduce_sum, epoch_permutation, seed_of, shard_batches
from .failures import FailureMixin, TrainingError
from .guard import BufferSnapshot, StopSignals, TrainingInterrupted, grad_norm
from .monitor import monitor_record
from .reporting import ReportingMixin
from .resume import CheckpointMixin
from .setup import SetupMixin
from .trainer_state import fresh_sums

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


class Trainer(SetupMixin, CheckpointMixin, FailureMixin, ReportingMixin):
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
        self.extra_state = {}  # see TrainerState.extra_state
        self.run_folder = None
        self._stop = StopSignals(announce=False)
        self._saved_epochs = config.train.epochs

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
                    primary = f"test_{self.task.primary}"
                    improved = bool(eval_rec) and self.task.better(eval_rec[primary], self.best)
                    if improved:
                        self.best = eval_rec[primary]
                    rec[f"best_{primary}"] = math.nan if self.best is None else self.best
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
        bar = self._progress_bar(epoch, len(batches), start)
        t_epoch, elapsed0 = time.perf_counter(), self.elapsed
        try:
            stream = self.train_data.iterate(
                batches[start:], self.device, self.dtype, epoch=epoch, seed=cfg.train.seed
            )
            for i, (x, y) in enumerate(stream, start):
                t0, step_before = time.perf_counter(), self.step
                self._batch_indices = batches[i]
                rec = self._train_step(x, y, epoch, i)
                self.batch = i + 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                # the gradient-quality monitor is reported separately, not as training time
                monitor_time = float(rec.get("monitor_time_s", 0.0))
                self.epoch_sums["monitor_time"] += monitor_time
                dt = time.perf_counter() - t0 - monitor_time
                self.train_time += dt
                self.elapsed = elapsed0 + (time.perf_counter() - t_epoch)
                rec["step_time_s"], rec["time_s"] = dt, self.elapsed
                rate = self.task.throughput
                if rate is not None and not rec.get("skipped", False) and dt > 0:
                    rec[rate] = rec["n"] / dt  # units (e.g. tokens) per second of this step
                stop = bool(rec.pop("stop"))
                self._add_to_sums(rec)
                if rec.get("skipped", False) or self.step % cfg.log.every == 0:
                    self.logger.log("step", rec)
                self._show_step(bar, rec)
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
        return self._epoch_summary(t_epoch)

    def _train_step(self, x: Tensor, y: Tensor, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """One training step on the batch ``(x, y)``: its record for ``metrics.jsonl``."""
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
        fwd = self._forward(self.model, x, y, gen, pretrain=pretrain, use_jac=use_jac)
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
        gen: torch.Generator,
        *,
        pretrain: bool,
        use_jac: bool,
    ) -> _Forward:
        """The forward pass and the loss (in fp32 whatever the compute precision); a DEQ solve
        refused for non-finite values is returned as ``error``, not raised."""
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
                    store, idx = self.warm_start, getattr(self, "_batch_indices", None)
                    z0 = (
                        None
                        if store is None or idx is None
                        else store.get(idx, dtype=self.dtype, device=self.device)
                    )
                    out = self.call(model, x, mode="deq", jac_reg=use_jac, generator=gen, z0=z0)
                    if store is not None and idx is not None and out.info is not None:
                        store.put(idx, as_tuple(out.info.z))
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
        n = float(self.task.count(y))
        nstep, res, conv = forward_stats(fwd.info)
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
        self.amp.backward(fwd.loss)
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
