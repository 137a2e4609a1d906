"""Checkpoint state of a run (:class:`CheckpointMixin`): what ``last.pt`` / ``best.pt`` hold,
writing them only when every parameter and buffer is finite on every rank, and restoring a run
from ``last.pt`` exactly where it stopped (position, RNG streams, optimiser, schedule, partial
epoch statistics, :attr:`~.trainer_state.TrainerState.extra_state`).

Where ``--resume`` starts (:meth:`CheckpointMixin._resume_position`), nothing lost:

* from ``last.pt``;
* without it, from ``best.pt`` (said in a notice): it holds the same complete state as the
  ``last.pt`` written with it, so the run continues bit for bit from that epoch; the records
  after it in ``metrics.jsonl`` are dropped and trained again, and ``train.epochs`` may not be
  below the epochs the history records;
* with neither, from the beginning only when ``metrics.jsonl`` records at most one finished
  epoch (what a run killed before its first checkpoint leaves: the first epoch's record is
  written just before its checkpoint) and the config matches the folder's ``config.yaml``
  (beyond what a resume may change), so that the records dropped are trained again as they
  were; otherwise the resume is refused, nothing changed, with what to do.

A ``best.pt`` written by another model (a config that differs beyond what a resume may change)
is refused rather than overwritten, a ``metrics.jsonl`` deleted or emptied since the checkpoint
is reported, and a checkpoint without its hash is loaded with an "unverified" note.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from phantomdeq.data import DataError

from .config import (
    RESUMABLE_TRAIN_KEYS,
    ConfigError,
    config_differences,
    config_from_dict,
    config_to_dict,
)
from .distributed import barrier
from .failures import TrainingError
from .guard import nonfinite_entries
from .metrics import history_gap, recorded_epochs, truncate_metrics
from .run_folder import (
    CheckpointError,
    RunFolderError,
    capture_rng_state,
    check_finite_weights,
    load_checkpoint,
    load_model_weights,
    restore_rng_state,
    save_checkpoint,
)
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

    def _note(self, message: str) -> None:
        """A ``phantomdeq:`` note on stderr (rank 0)."""
        if self.dist.is_main:
            print(f"phantomdeq: {message}", file=sys.stderr)

    def _resume_position(self) -> None:
        """Where ``--resume`` starts (see the module docstring); raises before anything in the
        folder changes when it cannot start without losing what the folder holds."""
        last, best = self.out_dir / "last.pt", self.out_dir / "best.pt"
        if last.is_file():
            self._load_resume(last)
            return
        metrics = self.out_dir / "metrics.jsonl"
        history = recorded_epochs(metrics)
        best_problem = ""
        if best.is_file():
            try:
                state = load_checkpoint(best, map_location=self.device, on_unverified=self._note)
            except CheckpointError as exc:
                best_problem = f" and its best.pt is unreadable ({exc})"
            else:
                epoch, step = int(state["epoch"]), int(state["step"])
                later = (
                    f"; the records after it in metrics.jsonl (to epoch {history}) are dropped "
                    f"and trained again"
                    if history > epoch
                    else ""
                )
                self._load_resume(
                    best,
                    state=state,
                    history_epochs=history,
                    announce=f"no last.pt in {str(self.out_dir)!r}; resuming from best.pt, the "
                    f"complete state after epoch {epoch} (step {step}){later}",
                )
                return
        if history > 1:  # a kill before the first checkpoint leaves one epoch at most
            raise RunFolderError(
                f"--resume: {str(self.out_dir)!r} has no last.pt{best_problem or ' nor best.pt'} "
                f"to continue from, but its metrics.jsonl records {history} trained epoch(s); "
                f"starting over would lose them, so nothing was changed: put the run's last.pt "
                f"(or best.pt) back, or start afresh with --overwrite"
            )
        # killed before its first checkpoint: start again, with the config it was started with
        self._check_saved_config()
        self._adopt_best()
        self._note(
            f"no checkpoint in {str(self.out_dir)!r} yet; starting the run from the beginning"
        )
        if self.dist.is_main:
            truncate_metrics(metrics, 0, 0, 0)

    def _check_saved_config(self) -> None:
        """Refuse to restart a run with a config that differs from its ``config.yaml`` beyond
        what a resume may change (an unreadable ``config.yaml`` is not checked)."""
        path = self.out_dir / "config.yaml"
        try:
            import yaml

            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            saved = config_from_dict(raw)
        except Exception:  # missing or unreadable: nothing to compare with
            return
        differ = [k for k in config_differences(saved, self.config) if k != "train.epochs"]
        if differ:
            raise ConfigError(
                f"cannot resume the run in {str(self.out_dir)!r} (no checkpoint yet): the "
                f"config differs from its config.yaml in {', '.join(differ)}; resume with "
                f"that config, or start afresh with this one with --overwrite"
            )

    def _load_resume(
        self,
        path: Path | None = None,
        *,
        state: dict[str, Any] | None = None,
        history_epochs: int = 0,
        announce: str = "",
    ) -> None:
        """Restore the run from the checkpoint ``path`` (default ``last.pt``; ``state`` when
        already loaded); ``history_epochs``: the epochs ``metrics.jsonl`` records, which
        ``train.epochs`` may not go below either; ``announce``: a note printed once every
        check has passed."""
        cfg = self.config
        path = self.out_dir / "last.pt" if path is None else path
        if state is None:
            state = load_checkpoint(path, map_location=self.device, on_unverified=self._note)
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
        if cfg.train.epochs < history_epochs:
            raise ConfigError(
                f"train.epochs: the run in {str(self.out_dir)!r} has already trained "
                f"{history_epochs} epoch(s) (metrics.jsonl); to extend it, set at least "
                f"{history_epochs}, got {cfg.train.epochs}"
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
        if path.name != "best.pt":
            self._adopt_best()
        if announce:
            self._note(announce)
        if self.dist.is_main:
            metrics = self.out_dir / "metrics.jsonl"
            kept = truncate_metrics(metrics, self.epoch, self.step, self.batch)
            gap = history_gap(kept, self.epoch, self.step)
            if gap:
                self._note(
                    f"{str(metrics)!r} {gap} (deleted or emptied since {path.name} was "
                    f"written?): the history up to epoch {self.epoch}, step {self.step} is "
                    f"lost; the run continues and records from here on"
                )

    def _adopt_best(self) -> None:
        """Make ``best`` the primary metric of the model in ``best.pt``: a kill between writing
        ``best.pt`` and ``last.pt`` leaves ``best.pt`` one epoch ahead (the checkpoint module's
        invariant); an unreadable ``best.pt`` is replaced at the next evaluation."""
        path = self.out_dir / "best.pt"
        if not path.is_file():
            return
        try:
            best = load_checkpoint(path, map_location="cpu", on_unverified=self._note)
        except CheckpointError as exc:
            if self.dist.is_main:
                print(f"phantomdeq: {exc}; it is replaced at the next evaluation", file=sys.stderr)
            self.best = None
            return
        try:
            differ = [
                k
                for k in config_differences(config_from_dict(best["config"]), self.config)
                if k != "train.epochs"
            ]
        except ConfigError as exc:
            differ = [f"a config that does not load ({exc})"]
        if differ:
            raise RunFolderError(
                f"--resume: {str(path)!r} holds another model (its config differs from this "
                f"run's in {', '.join(differ)}); this run would overwrite it with its own best "
                f"model: move it out of {str(self.out_dir)!r} (or delete it), then resume"
            )
        value = saved_best(best)
        if value is not None and self.task.better(value, self.best):
            self.best = value

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
