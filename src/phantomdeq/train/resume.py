"""Checkpoint state of a run (:class:`CheckpointMixin`): what ``last.pt`` / ``best.pt`` hold,
writing them only when every parameter and buffer is finite on every rank, and restoring a run
from ``last.pt`` exactly where it stopped (position, RNG streams, optimiser, schedule, partial
epoch statistics, :attr:`~.trainer_state.TrainerState.extra_state`)."""

from __future__ import annotations

import sys
from typing import Any

from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import (
    RESUMABLE_TRAIN_KEYS,
    ConfigError,
    config_differences,
    config_from_dict,
    config_to_dict,
)
from .distributed import barrier
from .guard import nonfinite_entries
from .metrics_log import truncate_metrics
from .model_state import check_finite_weights, load_model_weights
from .trainer_state import TrainerState, fresh_sums

__all__ = ["CheckpointMixin", "saved_best"]


def saved_best(state: dict[str, Any]) -> float | None:
    """The best evaluation value of the task's primary metric a checkpoint holds (None: no
    evaluation yet); checkpoints written before tasks hold the accuracy as ``best_acc``, -1
    for none."""
    if "best_metric" in state:
        value = state["best_metric"]
        return None if value is None else float(value)
    legacy = float(state.get("best_acc", -1.0))
    return legacy if legacy >= 0 else None


class CheckpointMixin(TrainerState):
    """Saving and restoring the run's state."""

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
        self.epoch_sums = {**fresh_sums(), **dict(state.get("epoch_sums") or {})}
        initial = state.get("initial_loss")
        self.initial_loss = None if initial is None else float(initial)
        last = state.get("last_loss")
        self.last_loss = None if last is None else (int(last[0]), float(last[1]))
        self.best = saved_best(state)
        self.elapsed = float(state.get("time_s", 0.0))
        self.train_time = float(state.get("train_time_s", 0.0))
        self.last_eval = dict(state.get("last_eval", {}))
        self.last_checkpoint = (self.epoch, self.batch, self.step)
        self._saved_epochs = saved.train.epochs
        self._adopt_best()
        if self.dist.is_main:
            truncate_metrics(self.out_dir / "metrics.jsonl", self.epoch, self.step, self.batch)

    def _adopt_best(self) -> None:
        """Make ``best`` the primary metric of the model in ``best.pt``: a kill between writing
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
            self.best = None
            return
        value = saved_best(best)
        if value is not None and self.task.better(value, self.best):
            self.best = value

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
            "best_metric": self.best,
            # as read before tasks: "best_acc" of a classifier, -1 before the first evaluation
            f"best_{self.task.primary}": -1.0 if self.best is None else self.best,
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
