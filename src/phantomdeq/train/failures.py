"""The failure policy of a run (:class:`FailureMixin`): a non-finite loss or gradient stops
the run or skips the step (``train.on_nonfinite``), too many skips in a row or a diverged
evaluation stop it with a report naming the step and the last finite checkpoint, a signal
stops it after writing ``last.pt`` (the checks themselves are in :mod:`.guard`, the signal
handling in :mod:`.guard`)."""

from __future__ import annotations

import contextlib
import math
import signal
from typing import Any

from .guard import BufferSnapshot, TrainingInterrupted
from .trainer_state import TrainerState

__all__ = ["FailureMixin", "TrainingError"]


class TrainingError(RuntimeError):
    """Training diverged or cannot continue (non-finite loss, gradient or state, accuracy at
    chance with a risen loss); the message names the step and the last finite checkpoint."""


class FailureMixin(TrainerState):
    """Divergence reports, non-finite steps, interrupts."""

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
            raise TrainingError(
                f"training diverged: after epoch {self.epoch} (step {self.step}) {verdict}; "
                f"the checkpoints in {str(self.out_dir)!r} hold a diverged model. Try a lower "
                f"optim.lr, optim.grad_clip > 0 or a warm-up (optim.warmup_steps)."
            )
