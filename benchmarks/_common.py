"""The one timing helper of the benchmark scripts: the reference cells, timing (one call,
interleaved rounds), the machine and its load, a baseline version of the package loaded beside
this one (A/B of a change), JSON output and the terminal table."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn


class ConvCell(nn.Module):
    """The residual block of MDEQ-Tiny at one resolution, as a DEQ cell:
    f(z, x) = GN(relu(z + GN(conv(relu(GN(conv(z))))) + x)), conv 3x3 C -> 5C -> C.
    """

    def __init__(self, channels: int = 24, expansion: int = 5, groups: int = 8) -> None:
        super().__init__()
        hidden = channels * expansion
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.gn3 = nn.GroupNorm(groups, channels)
        with torch.no_grad():  # keep it contractive-ish so solvers behave as in training
            self.conv1.weight.mul_(0.5)
            self.conv2.weight.mul_(0.5)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(z)))))
        return self.gn3(torch.relu(z + y + x))


class LightCell(nn.Module):
    """The light benchmark cell of issue 13: f(z, x) = GN(relu(z + GN(conv(relu(GN(conv(z))))) +
    x)) with two 3x3 convolutions C -> C (24.4 ms per call at batch 64 x 24 x 32 x 32 on the dev
    machine's 2 cores, ~5x cheaper than :class:`ConvCell`, so the solvers' own work weighs 5x
    more in the ratio)."""

    def __init__(self, channels: int = 24, groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.gn3 = nn.GroupNorm(groups, channels)
        with torch.no_grad():
            self.conv1.weight.mul_(0.5)
            self.conv2.weight.mul_(0.5)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(z)))))
        return self.gn3(torch.relu(z + y + x))


CELLS = {"mdeq": ConvCell, "light": LightCell}


#: the clocks a benchmark may time with: ``wall`` (elapsed time) and ``cpu`` (the CPU time of
#: the process, every thread: on a shared machine with one thread, the time the call computed,
#: not the time it waited for a core -- memory traffic of other processes still slows it)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timeit(fn: Callable[[], object], *, sync: bool = False, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    if sync:
        torch.cuda.synchronize()
    t0 = now()
    fn()
    if sync:
        torch.cuda.synchronize()
    return now() - t0


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    sync: bool = False,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Run each callable ``warmup`` times, then ``repeats`` rounds alternating between them;
    return every timed call of each (seconds, on ``clock``, one of :data:`CLOCKS`).
    Alternation spreads machine noise evenly."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timeit(fn, sync=sync, clock=clock))
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1, sync: bool = False
) -> dict[str, float]:
    """The median of each callable's :func:`interleaved_times` (seconds)."""
    times = interleaved_times(fns, repeats=repeats, warmup=warmup, sync=sync)
    return {k: statistics.median(v) for k, v in times.items()}


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    with contextlib.suppress(OSError, AttributeError):
        return list(os.getloadavg())
    return None


def load_baseline(path: str | Path) -> ModuleType:
    """Import another version of the package -- ``path`` is its ``src`` folder or the
    ``phantomdeq`` folder itself, e.g. from ``git archive <rev> src | tar -x -C /tmp/base`` --
    as the package ``phantomdeq_baseline`` beside this one (its modules import each other
    relatively), for an A/B measurement of a change in one process."""
    root = Path(path)
    if not (root / "__init__.py").is_file():
        root = root / "phantomdeq"
    init = root / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: no phantomdeq package at {path}")
    spec = importlib.util.spec_from_file_location(
        "phantomdeq_baseline", init, submodule_search_locations=[str(root)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: cannot load {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["phantomdeq_baseline"] = module
    spec.loader.exec_module(module)
    return module


def machine() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: str | Path, payload: dict[str, object]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2))


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [
        [f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
