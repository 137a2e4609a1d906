"""Non-finite guards and divergence verdicts of the training loop.

* :func:`grad_norm` -- the global gradient norm, computed once per step before
  ``optimizer.step``: it is non-finite exactly when some gradient entry is (or the norm
  overflows), and gradient clipping reuses it.
* :func:`nonfinite_entries` -- names of parameters *and* buffers (BatchNorm running statistics)
  holding NaN/inf, checked before every checkpoint is written.
* :class:`BufferSnapshot` -- copies of the BatchNorm buffers taken before a training forward,
  put back when the step is dropped (``train.on_nonfinite: skip``), so a dropped step leaves no
  trace in the running statistics.
* :func:`chance_bound` / :func:`at_chance` -- a test accuracy indistinguishable from guessing
  (within three binomial standard deviations of ``1 / num_classes``); :func:`chance_divergence`
  -- the end-of-training verdict: at chance *and* a training loss above twice its first value
  (a run that merely has not learned yet keeps its loss near the first value).
* :class:`TrainingError` and its reports: :func:`divergence_error` (a non-finite loss,
  gradient, state or evaluation, too many skipped steps: where, after which blow-up of the loss,
  and the last finite checkpoint, :func:`checkpoint_text`) and :func:`final_divergence_error`
  (the task's end-of-training verdict).

SIGINT (Ctrl-C) and SIGTERM (what schedulers and ``torchrun`` send) as a graceful stop.

While a run trains, the first SIGINT or SIGTERM only sets :attr:`StopSignals.requested`; the
training loop notices it after the current step (all ranks agree through the step's
all-reduce), writes ``last.pt`` at that exact position (mid-epoch included) when the state is
finite, and raises :class:`TrainingInterrupted`. A second signal raises
:class:`TrainingInterrupted` at once (the run then resumes from the last checkpoint written).
``phantomdeq train`` exits with ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "final_divergence_error",
    "divergence_error",
    "checkpoint_text",
    "TrainingError",
    "BufferSnapshot",
    "StopSignals",
    "TrainingInterrupted",
    "at_chance",
    "chance_bound",
    "chance_divergence",
    "grad_norm",
    "nonfinite_entries",
]


# --- non-finite values and divergence -------------------------------------------------------------------------------------


def grad_norm(params: Iterable[nn.Parameter]) -> Tensor:
    """Euclidean norm of all gradients together (a 0-d tensor; 0 when there are none)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def nonfinite_entries(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` with a NaN or inf."""
    bad: list[str] = []
    with torch.no_grad():
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


class BufferSnapshot:
    """Copies of every BatchNorm buffer of ``module`` (running mean/variance and the batch
    counter); :meth:`restore` writes them back in place."""

    def __init__(self, module: nn.Module) -> None:
        self._saved: list[tuple[Tensor, Tensor]] = []
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if buf is not None:
                        self._saved.append((buf, buf.detach().clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for buf, copy in self._saved:
                buf.copy_(copy)


def chance_bound(num_classes: int, n: int) -> float:
    """The highest accuracy that guessing reaches with appreciable probability on ``n`` test
    samples: ``p + 3 sqrt(p (1 - p) / n)`` with ``p = 1 / num_classes``."""
    if num_classes < 2 or n < 1:
        raise ValueError(f"chance_bound: need num_classes >= 2 and n >= 1, got {num_classes}, {n}")
    p = 1.0 / num_classes
    return p + 3.0 * math.sqrt(p * (1.0 - p) / n)


def at_chance(accuracy: float, num_classes: int, n: int) -> bool:
    """Whether ``accuracy`` on ``n`` samples is within noise of guessing (or not a number)."""
    return not math.isfinite(accuracy) or accuracy <= chance_bound(num_classes, n)


def chance_divergence(
    *,
    accuracy: float,
    n: int,
    num_classes: int,
    first_loss: float | None,
    last_loss: float,
) -> str:
    """Why a finished run counts as diverged (empty when it does not): test ``accuracy`` on
    ``n`` samples at chance level and the last epoch's mean training loss ``last_loss`` above
    twice the first step's ``first_loss`` (or not a number)."""
    if n < 1 or num_classes < 2 or first_loss is None:
        return ""
    if not at_chance(accuracy, num_classes, n) or last_loss <= 2.0 * first_loss:
        return ""
    return (
        f"the test accuracy {100 * accuracy:.1f} % is at chance level for {num_classes} classes "
        f"and the training loss blew up from {first_loss:.3g} (step 1) to {last_loss:.3g} "
        f"(last epoch's mean)"
    )


class TrainingError(RuntimeError):
    """Training diverged or cannot continue (non-finite loss, gradient or state, accuracy at
    chance with a risen loss); the message names the step and the last finite checkpoint."""


def checkpoint_text(out_dir: Path, last_checkpoint: tuple[int, int, int] | None) -> str:
    """Which checkpoint a stopped run continues from: ``last_checkpoint`` is the (epoch, batch,
    step) of the last ``last.pt`` written in ``out_dir``, None before the first."""
    if last_checkpoint is None:
        return "no checkpoint was written yet"
    epoch, batch, step = last_checkpoint
    where = f"epoch {epoch}" if batch == 0 else f"epoch {epoch} + {batch} batches"
    return (
        f"the last (finite) checkpoint is {str(out_dir / 'last.pt')!r} (after {where}, step {step})"
    )


def divergence_error(
    what: str,
    at: str,
    *,
    initial_loss: float | None,
    last_loss: tuple[int, float] | None,
    checkpoint: str,
) -> TrainingError:
    """The report of a run that diverged: ``what`` went wrong ``at`` which point, the blow-up of
    the training loss from ``initial_loss`` (step 1) to ``last_loss`` (step, loss) when it grew
    tenfold, the ``checkpoint`` to continue from (:func:`checkpoint_text`) and what to try."""
    blowup = ""
    if initial_loss is not None and last_loss is not None:
        step, loss = last_loss
        if loss > 10.0 * max(initial_loss, 1e-12):
            blowup = (
                f", after the training loss blew up from {initial_loss:.3g} (step 1) "
                f"to {loss:.3g} (step {step})"
            )
    return TrainingError(
        f"training diverged: {what} {at}{blowup}; training stopped, "
        f"{checkpoint}. Try a lower optim.lr, optim.grad_clip > 0, more "
        f"solver.max_iter, pretraining or train.on_nonfinite: skip."
    )


def final_divergence_error(verdict: str, epoch: int, step: int, out_dir: Path) -> TrainingError:
    """The report of the task's end-of-training ``verdict`` (e.g. accuracy at chance with a
    blown-up loss) after ``epoch`` epochs, ``step`` steps."""
    return TrainingError(
        f"training diverged: after epoch {epoch} (step {step}) {verdict}; "
        f"the checkpoints in {str(out_dir)!r} hold a diverged model. Try a lower "
        f"optim.lr, optim.grad_clip > 0 or a warm-up (optim.warmup_steps)."
    )


# --- SIGINT / SIGTERM ------------------------------------------------------------------------------

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal. ``signum`` is the signal, ``exit_code`` ``128 + signum``;
    the message says where the run stopped and which checkpoint it continues from.
    ``immediate`` marks the exception raised by a second signal wherever the run was."""

    def __init__(self, signum: int, message: str, *, immediate: bool = False) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.immediate = immediate

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable with its own signature: a worker process (``phantomdeq ablate --jobs``)
        # returns it to the parent, where a failed unpickling would break the process pool
        return (type(self), (self.signum, str(self)), {"immediate": self.immediate})

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    """Context manager installing the graceful handlers for SIGINT and SIGTERM (main thread
    only; elsewhere it does nothing) and restoring the previous handlers on exit.

    ``announce`` prints one line on stderr when the first signal arrives (rank 0)."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            raise TrainingInterrupted(
                signum, f"{name} received twice; stopped at once", immediate=True
            )
        self.requested = signum
        if self.announce:
            print(
                f"phantomdeq: {name} received; stopping after the current step "
                f"(send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
