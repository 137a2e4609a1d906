"""Measuring one training step: named time marks (:class:`Clock`), a solver wrapper that marks
its calls (:func:`timed_solver`), the peak of live CPU tensor memory from the allocator's own
events (:func:`cpu_peak_memory`; there is no allocator peak counter on CPU) with the profiler's
native log lines kept off stderr (:func:`without_profiler_noise`), and the description of the
machine stored with every measurement (:func:`machine`).

``torch.profiler`` (libkineto) writes lines such as ``USDT:2026-11-27 21:26:37 31955:31955
SyncActivityProfilerHandler.cpp:52] profiler_start`` straight to file descriptor 2, where no
Python-level setting (``KINETO_LOG_LEVEL`` does not cover them) reaches, and c10 warns there
about blocks allocated before profiling and freed during it. :func:`without_profiler_noise`
sends descriptor 2 to a temporary file while its block runs and then writes back every line
that is not such a log line, so warnings and errors still reach the user.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import phantomdeq as pdq

__all__ = [
    "NOISE",
    "Clock",
    "MemoryProfile",
    "cpu_peak_memory",
    "machine",
    "timed_solver",
    "without_profiler_noise",
]


class Clock:
    """Named time marks: ``perf_counter`` on CPU, CUDA events on GPU (no extra host syncs)."""

    def __init__(self, device: torch.device, *, profile_marks: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.profile_marks = profile_marks
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.profile_marks:  # an empty profiler range: its timestamp locates the mark
            with torch.profiler.record_function(f"phantomdeq.mark.{name}"):
                pass
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[name] = ev
        else:
            self.marks[name] = time.perf_counter()

    def ms(self, a: str, b: str) -> float:
        if a not in self.marks or b not in self.marks:
            return math.nan
        if self.cuda:
            return float(self.marks[a].elapsed_time(self.marks[b]))
        return (self.marks[b] - self.marks[a]) * 1e3


class TimedSolver:
    """``solver`` with the marks ``solve_start``/``solve_end`` set on ``clock`` around each call
    (a wrapper conforming to the :class:`phantomdeq.Solver` protocol)."""

    def __init__(self, solver: pdq.Solver, clock: Any) -> None:
        self.solver = solver
        self.clock = clock

    def __call__(self, g: Any, z0: Any) -> pdq.Solution:
        self.clock.mark("solve_start")
        sol = self.solver(g, z0)
        self.clock.mark("solve_end")
        return sol

    def __repr__(self) -> str:
        return f"timed({self.solver!r})"


class TimedUnrollingSolver(TimedSolver):
    """:class:`TimedSolver` of a solver that also unrolls (BPTT's forward)."""

    def unroll(self, g: Any, z0: Any) -> tuple[Any, pdq.Solution]:
        self.clock.mark("solve_start")
        out = self.solver.unroll(g, z0)  # type: ignore[attr-defined]
        self.clock.mark("solve_end")
        return out  # type: ignore[no-any-return]


class TimedInverseSolver(TimedSolver):
    """:class:`TimedSolver` of a solver that also returns its inverse estimate (SHINE's
    forward Broyden)."""

    def solve_with_inverse(self, g: Any, z0: Any) -> pdq.Solution:
        self.clock.mark("solve_start")
        sol = self.solver.solve_with_inverse(g, z0)  # type: ignore[attr-defined]
        self.clock.mark("solve_end")
        return sol  # type: ignore[no-any-return]


def timed_solver(solver: pdq.Solver, clock: Any) -> pdq.Solver:
    """A wrapper of ``solver`` whose calls (and ``unroll`` / ``solve_with_inverse`` calls, when
    ``solver`` has them) set the marks ``solve_start``/``solve_end`` on ``clock`` (anything
    with a ``mark(name)`` method). It satisfies the solver protocol, so ``DEQ`` accepts it like
    ``solver`` itself."""
    if isinstance(solver, pdq.UnrollingSolver):
        return TimedUnrollingSolver(solver, clock)
    if isinstance(solver, pdq.solvers.InverseSolver):
        return TimedInverseSolver(solver, clock)
    return TimedSolver(solver, clock)


@dataclass
class MemoryProfile:
    """Result of :func:`cpu_peak_memory`: bytes relative to the live memory at the start."""

    peak_bytes: int
    at_marks: dict[str, int] = field(default_factory=dict)
    events: int = 0


def cpu_peak_memory(fn: Callable[[], object], *, marks: Sequence[str] = ()) -> MemoryProfile:
    """Peak of live CPU tensor bytes while ``fn()`` runs, from the allocator's own events.

    ``torch.profiler`` with ``profile_memory=True`` records one ``[memory]`` event per CPU
    allocation (positive ``nbytes``) and per free (negative ``nbytes``) with its timestamp. Their
    running sum, in time order, is the number of bytes allocated during ``fn`` that are still
    live; its maximum is the peak. Frees of memory allocated before profiling started carry no
    size and are ignored (so the result never under-counts). ``marks`` are names of
    ``record_function`` ranges opened by ``fn`` as ``phantomdeq.mark.<name>``; the live bytes at
    each one's start are returned in ``at_marks``.
    """
    from torch.profiler import ProfilerActivity, profile

    # libkineto prints "USDT:... profiler_start" lines on descriptor 2: keep them off stderr
    with (
        without_profiler_noise(),
        profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False
        ) as prof,
    ):
        fn()
    raw = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    mem: list[tuple[int, int]] = []
    mark_ts: dict[str, int] = {}
    for e in raw:
        name = e.name()
        if name == "[memory]":
            if e.device_type() == torch.autograd.DeviceType.CPU:
                mem.append((e.start_ns(), e.nbytes()))
        elif name.startswith("phantomdeq.mark."):
            mark_ts[name[len("phantomdeq.mark.") :]] = e.start_ns()
    mem.sort(key=lambda t: t[0])
    live = 0
    peak = 0
    at: dict[str, int] = {}
    pending = sorted((ts, m) for m, ts in mark_ts.items() if m in marks)
    i = 0
    for ts, nbytes in mem:
        while i < len(pending) and pending[i][0] < ts:
            at[pending[i][1]] = live
            i += 1
        live += nbytes
        peak = max(peak, live)
    for _, m in pending[i:]:
        at[m] = live
    return MemoryProfile(peak_bytes=peak, at_marks=at, events=len(mem))


#: a libkineto log line (severity tag, timestamp, pid:tid, source file and line), or c10's
#: warning that a block allocated before profiling was freed during it -- expected here: such
#: frees carry no size and are left out of the peak on purpose (``cpu_peak_memory``)
NOISE = re.compile(
    r"^(USDT|STAGE|INFO|LOG):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.cpp:\d+\] "
    r"|^\[W\d{4} [\d:.]+ \S*CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated "
    r"before the profiling started"
)


@contextlib.contextmanager
def without_profiler_noise() -> Iterator[None]:
    """Run the block with file descriptor 2 captured; replay all but the profiler's log lines
    on stderr afterwards (also when the block raises)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def machine() -> dict[str, Any]:
    """The machine stored with a measurement: torch and Python versions, CPU model, torch
    threads, GPU name (or None) and the load averages (or None)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = list(os.getloadavg())
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": model,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": load,
    }
