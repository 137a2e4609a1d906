"""Stopping a process pool of training runs on a signal (``phantomdeq ablate --jobs``)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["StopWorkers", "ignore_stop_signals", "init_worker"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals() -> None:
    """Pool initializer: a worker ignores SIGINT/SIGTERM outside a run. Inside one the trainer's
    own handlers stop it after the current step; between runs a signal would kill the worker,
    and a dead worker breaks the whole pool (whose remaining workers are then killed without
    their checkpoint)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def init_worker(retain_memory: bool) -> None:
    """Pool initializer of ``ablate --jobs``: :func:`ignore_stop_signals`, and the parent's CPU
    memory policy (a spawned worker starts with the C library's defaults; see
    :func:`phantomdeq.retain_cpu_memory`)."""
    ignore_stop_signals()
    if retain_memory:
        from phantomdeq.cpu_memory import retain_cpu_memory

        retain_cpu_memory()


class StopWorkers:
    """While a study runs in pool workers, SIGINT/SIGTERM to this process cancel the runs not
    started and stop the running ones: each worker that holds a run folder's lock
    (:data:`~phantomdeq.train.run_dir.LOCK_FILE`, which names its pid) gets SIGTERM once per
    run, so its trainer checkpoints after the current step and stops; :meth:`poke` is called
    again while waiting, for runs a worker locks after the signal. (On SIGINT the runs that
    already held their lock are left to the terminal, which sends SIGINT to every process of
    the foreground group: a second signal would stop them without the checkpoint.) The caller
    collects what the workers return and then raises
    :class:`~phantomdeq.train.stop_signals.TrainingInterrupted` -- no worker trains on after
    the command has gone."""

    def __init__(self, pool: Any, futures: list[Any], prog: str, runs: Path) -> None:
        self.pool = pool
        self.prog = prog
        self.futures = futures
        self.runs = runs
        self.signum = 0
        self._told: set[tuple[int, str]] = set()
        self._previous: dict[int, Any] = {}

    def _holders(self) -> set[tuple[int, str]]:
        """(pid, run folder) of this pool's workers holding a run folder's lock."""
        from phantomdeq.train.run_dir import LOCK_FILE

        workers = set(getattr(self.pool, "_processes", None) or {})
        out = set()
        for lock in self.runs.glob(f"*/{LOCK_FILE}"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(lock.read_text().strip() or 0)
                if pid in workers and not (lock.parent / "result.json").exists():
                    out.add((pid, lock.parent.name))
        return out

    def poke(self) -> None:
        """SIGTERM to each worker in a run it has not been told to stop yet."""
        for pid, run in self._holders() - self._told:
            self._told.add((pid, run))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

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
        if signum == signal.SIGINT:
            self._told |= self._holders()
        self.poke()

    def __enter__(self) -> StopWorkers:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
