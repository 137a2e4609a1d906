"""Stopping a process pool of training runs on a signal (``phantomdeq ablate --jobs``)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any

__all__ = ["StopWorkers"]


class StopWorkers:
    """While the study runs in worker processes, SIGINT/SIGTERM to this process are passed on
    to the workers as SIGTERM (each running trainer then checkpoints after its current step
    and stops; the run stays unfinished and resumable) and the runs not started are
    cancelled; the caller collects what the workers return and then raises
    :class:`~phantomdeq.train.stop_signals.TrainingInterrupted` -- no worker is left training
    on after the command has gone."""

    def __init__(self, pool: Any, futures: list[Any], prog: str) -> None:
        self.pool = pool
        self.prog = prog
        self.futures = futures
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            return  # already stopping: wait for the workers' checkpoints
        self.signum = signum
        print(
            f"{self.prog}: {signal.Signals(signum).name} received; stopping the running "
            "runs after their current step",
            file=sys.stderr,
            flush=True,
        )
        for fut in self.futures:
            fut.cancel()  # not started yet
        for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)

    def __enter__(self) -> StopWorkers:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
