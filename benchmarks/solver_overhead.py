"""Question: how much does each forward solver cost beyond the network evaluations themselves,
eager, compiled (torch.compile) and replayed from a CUDA graph, with TorchDEQ's solvers beside?

Ratio = (time of a solve with a fixed budget of N evaluations, ``tol=0``) / (time of N bare f
evaluations), every variant measured side by side, alternating, in one process. Modes:
``eager``; ``compile`` -- the whole solve through ``torch.compile``; ``compile_cell`` -- the
eager solver around ``torch.compile(cell)``; ``graph`` -- the solve replayed from a CUDA graph.
Each mode is compared with the bare loop *in the same mode* (compiled solve or compiled cell /
compiled bare loop, captured solve / captured bare loop): the overhead the solver adds to what
that mode makes of f. The
ratio to the eager bare loop is reported too. Cells (``benchmarks/_common.py``): ``light`` (two
3x3 convolutions 24 -> 24) and ``mdeq`` (the MDEQ-Tiny block, 24 -> 120 -> 24); batch 64,
24 x 32 x 32, 18 evaluations. Goals (issue 13): CPU light <= 1.10 / 1.30 / 1.50, CPU mdeq
<= 1.05 / 1.10 / 1.15 (FixedPoint / Anderson m=5 / Broyden, full memory), CUDA mdeq <= 1.3.

    python benchmarks/solver_overhead.py [--device cpu|cuda] [--cells light,mdeq]
        [--modes eager,compile,graph] [--torchdeq] [--threads 2] [--repeats 7]
        [--cpu-memory retain|system] [--out benchmarks/results/solver_overhead.json]

``--cpu-memory retain`` (the default, as the ``phantomdeq`` command) keeps freed CPU memory in
the process (``phantomdeq.cpu_memory.retain_cpu_memory``); ``system`` keeps glibc's defaults, under which every
multi-MiB tensor is a fresh mmap and page faults take much of each f evaluation (see
``benchmarks/cpu_memory.py``). Minor page faults per call are recorded beside the times.

``graph`` needs CUDA (it is skipped on CPU); ``compile`` uses inductor (minutes of compilation
on a small CPU). TorchDEQ (``pip install --no-deps torchdeq==0.1.0``) is timed eagerly with the
same budget in evaluations of f (its Broyden evaluates f once more than its max_iter).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
from _common import CELLS, loadavg, machine, print_table, timeit, write_json  # noqa: E402
from phantomdeq.cpu_memory import (
    minor_page_faults,  # noqa: E402
    retain_cpu_memory,  # noqa: E402
)
from phantomdeq.solvers.graphed import CUDAGraphCapture, GraphedSolves  # noqa: E402

SOLVERS = ("FixedPoint", "Anderson", "Broyden")
MODES = ("eager", "compile", "compile_cell", "graph")
GOALS = {
    ("cpu", "light"): {"FixedPoint": 1.10, "Anderson": 1.30, "Broyden": 1.50},
    ("cpu", "mdeq"): {"FixedPoint": 1.05, "Anderson": 1.10, "Broyden": 1.15},
    ("cuda", "mdeq"): {"FixedPoint": 1.3, "Anderson": 1.3, "Broyden": 1.3},
    ("cuda", "light"): {"FixedPoint": 1.3, "Anderson": 1.3, "Broyden": 1.3},
}


def make_solver(name: str, n: int) -> pdq.SolverBase:
    if name == "FixedPoint":
        return pdq.FixedPoint(max_iter=n, tol=0.0)
    if name == "Anderson":
        return pdq.Anderson(max_iter=n, tol=0.0, m=5)
    return pdq.Broyden(max_iter=n, tol=0.0)


def torchdeq_solvers(n: int) -> dict[str, Callable[..., Any]] | None:
    try:
        from torchdeq.solver import get_solver
    except ImportError:
        return None
    kw = {"tol": 0.0, "stop_mode": "rel"}
    return {
        "FixedPoint": lambda f, x0: get_solver("fixed_point_iter")(f, x0, max_iter=n, **kw),
        "Anderson": lambda f, x0: get_solver("anderson")(f, x0, max_iter=n, m=5, lam=1e-4, **kw),
        # TorchDEQ's Broyden evaluates f once before its max_iter steps
        "Broyden": lambda f, x0: get_solver("broyden")(f, x0, max_iter=n - 1, **kw),
    }


class _CapturedLoop:
    """A callable replayed from a CUDA graph, with its tensor arguments copied into static
    buffers first (the bare-f floor of the ``graph`` mode)."""

    def __init__(self, fn: Callable[..., Any], *args: torch.Tensor) -> None:
        self.static = [a.clone() for a in args]
        backend = CUDAGraphCapture()
        self.backend = backend
        backend.capture(lambda: (fn(*self.static),))

    def __call__(self, *args: torch.Tensor) -> None:
        for s, a in zip(self.static, args):
            s.copy_(a)
        self.backend.replay()


def variants(
    cell: torch.nn.Module,
    x: torch.Tensor,
    n: int,
    modes: tuple[str, ...],
    with_torchdeq: bool,
) -> dict[str, Callable[[], object]]:
    z0 = torch.zeros_like(x)

    def bare_loop(z: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        for _ in range(n):
            z = cell(z, inp)
        return z

    fns: dict[str, Callable[[], object]] = {}
    compiled_cell = torch.compile(cell) if "compile_cell" in modes else None
    for mode in modes:
        if mode == "eager":
            fns["bare/eager"] = lambda: bare_loop(z0, x)
        elif mode in ("compile", "compile_cell"):
            if "bare/compile" not in fns:
                compiled = torch.compile(bare_loop)
                fns["bare/compile"] = lambda c=compiled: c(z0, x)
        else:
            captured = _CapturedLoop(bare_loop, z0, x)
            fns["bare/graph"] = lambda c=captured: c(z0, x)
        for name in SOLVERS:
            solver = make_solver(name, n)
            if mode == "eager":
                fns[f"{name}/eager"] = lambda s=solver: s(lambda z: cell(z, x), z0)
            elif mode == "compile_cell":
                fns[f"{name}/compile_cell"] = lambda s=solver, c=compiled_cell: s(
                    lambda z: c(z, x), z0
                )
            elif mode == "compile":

                def solve(z: torch.Tensor, inp: torch.Tensor, s: pdq.SolverBase = solver) -> Any:
                    return s(lambda u: cell(u, inp), z).z

                compiled_solve = torch.compile(solve)
                fns[f"{name}/compile"] = lambda c=compiled_solve: c(z0, x)
            else:
                graphs = GraphedSolves()
                fns[f"{name}/graph"] = lambda s=solver, gr=graphs: gr(s, cell, z0, (x,))
    if with_torchdeq:
        theirs = torchdeq_solvers(n)
        if theirs is not None:
            for name, fn in theirs.items():
                fns[f"{name}/torchdeq"] = lambda fn=fn: fn(lambda z: cell(z, x), z0)
    return fns


def measure(
    fns: dict[str, Callable[[], object]], repeats: int, sync: bool
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Times (s) and minor page faults of each callable, ``repeats`` interleaved rounds."""
    with torch.no_grad():
        for fn in fns.values():  # warm-up: compilation, capture, allocator
            fn()
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        faults: dict[str, list[int]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                f0 = minor_page_faults()
                times[k].append(timeit(fn, sync=sync))
                faults[k].append(minor_page_faults() - f0)
    return times, faults


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cells", default="light,mdeq", help=f"comma list of {tuple(CELLS)}")
    ap.add_argument("--modes", default="eager", help=f"comma list of {MODES}")
    ap.add_argument("--torchdeq", action="store_true", help="time TorchDEQ's solvers beside")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=24)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--cpu-memory", default="retain", choices=["retain", "system"])
    ap.add_argument("--out", default="benchmarks/results/solver_overhead.json")
    args = ap.parse_args(argv)
    if args.cpu_memory == "retain":
        retain_cpu_memory()
    cells = tuple(c for c in args.cells.split(",") if c)
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [c for c in cells if c not in CELLS] + [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown --cells/--modes entries {bad}; allowed {tuple(CELLS)}, {MODES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available (allowed here: cpu)")
    if "graph" in modes and args.device != "cuda":
        print("solver_overhead: mode 'graph' needs CUDA; skipped", file=sys.stderr)
        modes = tuple(m for m in modes if m != "graph")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = dev.type == "cuda"
    n = args.iters
    records: list[dict[str, Any]] = []
    rows: list[list[object]] = []
    t_start = time.perf_counter()
    for cell_name in cells:
        torch.manual_seed(0)
        cell = CELLS[cell_name](args.channels).to(dev).eval()
        x = torch.randn(args.batch, args.channels, args.size, args.size, device=dev)
        load0 = loadavg()
        fns = variants(cell, x, n, modes, args.torchdeq)
        times, faults = measure(fns, args.repeats, sync)
        med = {k: statistics.median(v) for k, v in times.items()}
        goals = GOALS.get((dev.type, cell_name), {})
        for key in fns:
            name, mode = key.split("/")
            if name == "bare":
                continue
            floor_mode = {"torchdeq": "eager", "compile_cell": "compile"}.get(mode, mode)
            floor = med[f"bare/{floor_mode}"]
            ratio = med[key] / floor
            goal = goals.get(name) if mode != "torchdeq" else None
            rec = {
                "cell": cell_name,
                "solver": name,
                "mode": mode,
                "solve_ms": med[key] * 1e3,
                "solve_min_ms": min(times[key]) * 1e3,
                "bare_ms": floor * 1e3,
                "bare_eager_ms": med["bare/eager"] * 1e3 if "bare/eager" in med else None,
                "ratio": ratio,
                "ratio_vs_eager_floor": med[key] / med["bare/eager"]
                if "bare/eager" in med
                else None,
                "ratio_min": min(times[key]) / min(times[f"bare/{floor_mode}"]),
                "minor_faults": statistics.median(faults[key]),
                "bare_minor_faults": statistics.median(faults[f"bare/{floor_mode}"]),
                "goal": goal,
                "met": None if goal is None else ratio <= goal,
                "loadavg_before": load0,
            }
            records.append(rec)
            rows.append(
                [
                    cell_name,
                    name,
                    mode,
                    rec["solve_ms"],
                    rec["bare_ms"],
                    ratio,
                    rec["ratio_min"],
                    int(rec["minor_faults"]),
                    "-" if goal is None else goal,
                    "-" if goal is None else ("yes" if ratio <= goal else "NO"),
                ]
            )
        print(f"  {cell_name} done (load {load0} -> {loadavg()})", file=sys.stderr, flush=True)
    print(
        f"solver overhead: batch={args.batch} C={args.channels} {args.size}x{args.size}, {n} "
        f"evaluations (tol=0), {dev}, {torch.get_num_threads()} thread(s), median of "
        f"{args.repeats} interleaved repeats; ratio = solve / {n} bare f calls in the same mode "
        f"(TorchDEQ: vs eager); CPU memory: {args.cpu_memory}"
    )
    print_table(
        [
            "cell",
            "solver",
            "mode",
            "solve ms",
            f"{n} x f ms",
            "ratio",
            "(min)",
            "faults",
            "goal",
            "met",
        ],
        rows,
    )
    write_json(
        args.out,
        {
            "machine": {**machine(), "loadavg_end": loadavg()},
            "args": vars(args),
            "wall_s": time.perf_counter() - t_start,
            "results": records,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
