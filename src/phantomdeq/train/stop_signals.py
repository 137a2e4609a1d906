"""SIGINT (Ctrl-C) and SIGTERM (what schedulers and ``torchrun`` send) as a graceful stop.

While a run trains, the first SIGINT or SIGTERM only sets :attr:`StopSignals.requested`; the
training loop notices it after the current step (all ranks agree through the step's
all-reduce), writes ``last.pt`` at that exact position (mid-epoch included) when the state is
finite, and raises :class:`TrainingInterrupted`. A second signal raises
:class:`TrainingInterrupted` at once (the run then resumes from the last checkpoint written).
``phantomdeq train`` exits with ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["StopSignals", "TrainingInterrupted"]

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
