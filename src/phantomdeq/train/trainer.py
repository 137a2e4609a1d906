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

The pieces around the loop live in their own modules: building from the config
(:mod:`.build`), batches, seeds and augmentation (:mod:`.batches`), the learning-rate schedule
(:mod:`.schedule`), evaluation and precise BatchNorm (:mod:`.evaluation`), processes and
collectives (:mod:`.distributed`), mixed precision -- autocast and the fp16 gradient scaler --
(:mod:`.precision`), checkpoints (:mod:`.checkpoint`) and metrics files (:mod:`.metrics_log`).
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from .metrics_log import MetricsLogger, plot_curves, read_metrics, truncate_metrics
from .precision import MixedPrecision, check_precision
from .schedule import LRSchedule

__all__ = ["Trainer", "TrainingError", "run_training"]


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss or state); the message says where and which
    checkpoint is the last good one."""


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
        self.device = resolve_device(wanted, self.dist)
        problem = check_precision(cfg.train.precision, cfg.train.dtype, self.device.type)
        if problem is not None:
            raise ConfigError(problem)
        self.amp = MixedPrecision(cfg.train.precision, self.device.type)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

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

    def _load_resume(self) -> None:
        path = self.out_dir / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"cannot resume: checkpoint {str(path)!r} not found")
        state = load_checkpoint(path, map_location=self.device)
        saved = config_from_dict(state["config"])
        differ = config_differences(saved, self.config)
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
        self._load_extra_state(state, path)
        restore_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_acc = float(state.get("best_acc", -1.0))
        self.elapsed = float(state.get("time_s", 0.0))
        self.train_time = float(state.get("train_time_s", 0.0))
        self.last_eval = dict(state.get("last_eval", {}))
        if self.dist.is_main:
            truncate_metrics(self.out_dir / "metrics.jsonl", self.epoch, self.step)

    def _extra_state(self) -> dict[str, Any]:
        """Checkpoint entries beyond model / optimiser / schedule / RNG / position: the mixed-
        precision state under ``"precision"`` (``train.precision`` and, for fp16, the
        ``GradScaler``'s scale and growth tracker). Restored by :meth:`_load_extra_state`."""
        return {"precision": self.amp.state_dict()}

    def _load_extra_state(self, state: dict[str, Any], path: Path) -> None:
        """Inverse of :meth:`_extra_state`. A checkpoint without ``"precision"`` (written before
        the option existed) was an fp32 run; the config check has already refused a change of
        ``train.precision`` on resume."""
        saved = state.get("precision", {"precision": "fp32", "scaler": {}})
        try:
            self.amp.load_state_dict(saved)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from exc

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            **self._extra_state(),
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
            error = f"non-finite DEQ state ({exc})"
        n = float(y.numel())
        nstep, res, conv = forward_stats(info)
        finite = 1.0 if (not error and bool(torch.isfinite(loss.detach()))) else 0.0
        stats = torch.tensor(
            [float(ce.detach()) * n, correct, n, nstep, res, conv, finite, 1.0], dtype=torch.float64
        )
        stats = all_reduce_sum(stats, self.dist)
        if float(stats[6]) < float(stats[7]):
            raise self._fail(error or f"non-finite loss ({float(loss.detach())})", epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.backward(loss)
        if cfg.optim.grad_clip > 0:
            self.amp.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.optim.grad_clip)
        lr = self.schedule.set_step(self.step)
        # fp16: an overflow of the scaled gradients makes the GradScaler skip this update and
        # lower the scale -- the normal way the scale is found, not a divergence (counted)
        applied = self.amp.step(self.optimizer)
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
        if self.amp.scaling:
            rec["grad_scale"] = self.amp.scale
            rec["scaler_skipped"] = 0 if applied else 1
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
        cfg = self.config
        torch.manual_seed(seed_of(cfg.train.seed, epoch, self.dist.rank, 1))
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
            "scaler_skipped": 0.0,
        }
        t_epoch = time.perf_counter()
        elapsed0 = self.elapsed
        try:
            stream = self.train_data.iterate(
                batches, self.device, self.dtype, epoch=epoch, seed=cfg.train.seed
            )
            for i, (x, y) in enumerate(stream):
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
                sums["scaler_skipped"] += float(rec.get("scaler_skipped", 0))
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
            **({"scaler_skipped_steps": sums["scaler_skipped"]} if self.amp.scaling else {}),
        }

    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (continuing a resumed run) and return the final metrics.

        Setup, training and teardown share one ``try``/``finally``: whatever fails (a bad config
        found on a rank, a missing checkpoint, a diverged run, an interrupt), the metrics files
        are closed and the process group is left (:meth:`_teardown`)."""
        cfg = self.config
        try:
            self._setup()
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
                        precision=cfg.train.precision,
                    )
                    eval_rec = evaluate(
                        self.net,
                        self.test_ds,
                        batch_size=cfg.data.eval_batch_size,
                        device=self.device,
                        dist_info=self.dist,
                        num_workers=cfg.data.num_workers,
                        precision=cfg.train.precision,
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
            self._teardown()
        return self._final_metrics()

    def _teardown(self) -> None:
        """Close the metrics files, draw the curves (rank 0) and leave the process group.

        Leaving is more than ``destroy_process_group``: the DDP wrapper (its C++ reducer) keeps
        the gloo process group -- and with it the gloo worker and TCP-loop threads -- alive
        until the wrapper is garbage-collected, which for the wrapper's reference cycles can be
        during interpreter shutdown; native threads that outlive the interpreter can abort the
        process at exit ("terminate called without an active exception"). So the wrapper is
        dropped and collected here, while the interpreter is fully alive."""
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
