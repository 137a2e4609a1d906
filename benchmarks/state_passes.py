"""Question: what is the lowest solver overhead the memory traffic of each solver allows on this
CPU, i.e. how far are the measured overheads (solver_overhead.py) from their floor?

Each solver iteration reads and writes whole states beside its f evaluation; a state is a few
MiB, larger than the caches once f has run, so each pass streams it from memory. The streams
(one read or write of a state) are *counted* on the benchmark's own solve, not modelled: every
ATen operation of the solve outside f, seen through a dispatch mode (``_streams.py``; each
operand of a product counts on its own), for a fixed budget of ``--iters`` evaluations. Per
iteration (``n = m = 5`` Anderson slots, Broyden iteration ``j``; ``tests/test_state_passes.py``
checks these counts):

* FixedPoint (damping 1): ``diff = fx - x`` (3), ``|diff|`` (1), ``|x|`` (1): **5**.
* Anderson m=5 (beta 1, a single-tensor state): one pass writes the slot's residual and image,
  ``[G, Y] = [fx - x, fx]`` (read fx and x, write two: 4), Gram row over the ``n`` slots
  (n + 1), ``|x|`` (1), mixing over the ``n`` image slots (n + 1): **17**.
* Broyden, full memory (residuals form): ``r = fx - x`` into its slot (3), inner products of
  ``r`` with the ``j + 2`` stored residuals (j + 3), ``|x|`` (1), the next iterate
  ``x + Σ c_l r_l`` over the ``j + 2`` residuals (j + 4): **2j + 11** (2j + 15 in the
  directions form before it: ``x + φ w`` (3), ``r`` (3), a two-row product over ``j + 2``
  directions (j + 4), ``U a`` (j + 1), ``r -= U a`` (3), ``|x|`` (1)).

Beside these, a solve streams its setup (the flat copy of z0: 2), the final record, and 3 in
each iteration where some samples improved and others did not (the tracker's per-sample
selection of the best iterate); the floor uses the counted total of the solve per
evaluation. ``--baseline`` counts another version of the package on the same solve too
(``git archive REV src | tar -x -C /tmp/base``), side by side.

This script times, cold (after writing 64 MiB elsewhere, as f's activations do), the
elementary passes at the benchmark's state size (batch 64 x 24 x 32 x 32 float32): a norm
(1 stream), a copy (2), a subtraction (3) and Anderson's two batched products over 5 slots; it
fits the time per stream, times f (the bare loop, as solver_overhead.py), and prints the floor
ratio ``1 + streams per evaluation x time per stream / time per f`` for each solver and cell.

    python benchmarks/state_passes.py [--cells light,mdeq] [--threads 2] [--repeats 30]
        [--iters 18] [--baseline /tmp/base/src] [--clock wall|cpu]
        [--out benchmarks/results/state_passes.json]

``--clock cpu`` times by the CPU time of the process (with one thread on a busy machine, the
time the pass computed, not the time it waited for a core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
from _common import CELLS, CLOCKS, load_baseline, machine, print_table, write_json  # noqa: E402
from _streams import count_solve  # noqa: E402
from phantomdeq.cpu_memory import retain_cpu_memory  # noqa: E402


def make_solvers(lib: Any, n: int) -> dict[str, Any]:
    """The solvers of solver_overhead.py, from package ``lib`` (this one or a baseline)."""
    return {
        "FixedPoint": lib.FixedPoint(max_iter=n, tol=0.0),
        "Anderson m=5": lib.Anderson(max_iter=n, tol=0.0, m=5),
        "Broyden": lib.Broyden(max_iter=n, tol=0.0),
    }


def cold_ms(
    fn: Callable[[], object], flush: torch.Tensor, repeats: int, now: Callable[[], float]
) -> float:
    fn()
    times = []
    for _ in range(repeats):
        flush.fill_(1.0)
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="light,mdeq")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--iters", type=int, default=18, help="evaluations of f per solve")
    ap.add_argument("--baseline", type=Path, default=None, help="src/ of a version to count too")
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS), help="cpu: process CPU time")
    ap.add_argument("--out", default="benchmarks/results/state_passes.json")
    args = ap.parse_args(argv)
    now = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    retain_cpu_memory()
    b, c, s = 64, 24, 32
    d = c * s * s
    x, fx, buf = (torch.randn(b, d) for _ in range(3))
    hist = torch.randn(b, 5, d)
    flush = torch.empty(64 * 1024 * 1024 // 4)
    with torch.no_grad():
        ops = {
            "norm (1 stream)": (1, lambda: torch.linalg.vector_norm(x, dim=1)),
            "copy (2)": (2, lambda: buf.copy_(fx)),
            "sub (3)": (3, lambda: torch.sub(fx, x, out=buf)),
            "Gram row over 5 slots (6)": (
                6,
                lambda: torch.bmm(hist[:, 0].unsqueeze(1), hist.transpose(1, 2)),
            ),
            "mix of 5 slots (6)": (
                6,
                lambda: torch.bmm(torch.rand(b, 1, 5), hist, out=buf.view(b, 1, d)),
            ),
        }
        op_ms = {name: cold_ms(fn, flush, args.repeats, now) for name, (_, fn) in ops.items()}
    per_stream = sum(op_ms.values()) / sum(k for k, _ in ops.values())
    rows: list[list[object]] = [
        [name, k, op_ms[name], op_ms[name] / k] for name, (k, _) in ops.items()
    ]
    print(
        f"cold passes over a {b} x {d} float32 state ({b * d * 4 / 2**20:.1f} MiB), "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print_table(["pass", "streams", "ms", "ms / stream"], rows)
    print(f"fitted: {per_stream:.3f} ms per stream")
    libs: dict[str, Any] = {"": pdq}
    if args.baseline is not None:
        libs["baseline "] = load_baseline(args.baseline)
    floors = []
    frows: list[list[object]] = []
    for cell_name in args.cells.split(","):
        torch.manual_seed(0)
        cell = CELLS[cell_name](c).eval()
        xin = torch.randn(b, c, s, s)
        z = torch.zeros_like(xin)
        with torch.no_grad():
            cell(z, xin)
            times = []
            for _ in range(max(5, args.repeats // 3)):
                t0 = now()
                z = cell(z, xin)
                times.append(now() - t0)
        f_ms = statistics.median(times) * 1e3
        z0 = torch.zeros_like(xin)

        def f(zz: torch.Tensor, cell: torch.nn.Module = cell, xin: torch.Tensor = xin) -> Any:
            return cell(zz, xin)

        for prefix, lib in libs.items():
            for solver, sol in make_solvers(lib, args.iters).items():
                segments = count_solve(sol, f, z0).segments
                streams = sum(segments) / args.iters
                floor = 1.0 + streams * per_stream / f_ms
                floors.append(
                    {
                        "cell": cell_name,
                        "solver": prefix + solver,
                        "f_ms": f_ms,
                        "streams": streams,
                        "streams_per_solve": sum(segments),
                        "streams_per_segment": segments,
                        "floor_ratio": floor,
                    }
                )
                steady = "/".join(f"{v:g}" for v in segments[1:-1])
                frows.append([cell_name, prefix + solver, f_ms, sum(segments), streams, floor])
                print(f"{cell_name} {prefix}{solver}: streams after each evaluation {steady}")
    print_table(
        ["cell", "solver", "f ms", "streams / solve", "streams / evaluation", "floor ratio"],
        frows,
    )
    write_json(
        args.out,
        {
            "machine": {**machine(), "loadavg": os.getloadavg()},
            "args": {**vars(args), "baseline": str(args.baseline)},
            "state_mib": b * d * 4 / 2**20,
            "pass_ms": op_ms,
            "ms_per_stream": per_stream,
            "floors": floors,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
