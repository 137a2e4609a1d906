"""Question: did a change make the solver loop slower? solver_overhead.py's measurement for two
versions of phantomdeq side by side in one process.

The baseline is another checkout's ``src`` directory (e.g. ``git archive main src | tar -x -C
/tmp/base``); its ``phantomdeq`` package is loaded under the name ``phantomdeq_baseline``, so
both versions' solvers run alternately on the same cell, input and thread. Ratio = solve time
/ time of the same number of bare f evaluations (as in solver_overhead.py).

    OMP_NUM_THREADS=1 python benchmarks/solver_overhead_ab.py --baseline /tmp/base/src \
        [--repeats 7] [--cpu-memory system|retain] [--clock wall|cpu] \
        [--out benchmarks/results/solver_overhead_ab.json]

``--cpu-memory retain`` keeps freed CPU memory in the process, as solver_overhead.py does by
default (no page faults on a fresh multi-MiB tensor); ``system`` (the default here, as in the
runs recorded before the option existed) keeps glibc's defaults. ``--clock cpu`` times each
call by the CPU time of the process instead of the elapsed time: with one thread on a machine
that other jobs keep busy, the time the call computed, not the time it waited for a core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
from _common import (  # noqa: E402
    ConvCell,
    LightCell,
    interleaved_times,
    load_baseline,
    loadavg,
    machine,
    print_table,
    write_json,
)
from phantomdeq.cpu_memory import retain_cpu_memory  # noqa: E402


class CheapCell(torch.nn.Module):
    """f(z, x) = tanh(0.5 z + x): two passes over the state, so a solve's time is mostly the
    solver's own bookkeeping (the sensitive measure of its overhead). Nonlinear, so no solver
    reaches a zero residual before the fixed budget ends."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh_(torch.add(x, z, alpha=0.5))


def make_solvers(lib: ModuleType, n: int) -> dict[str, object]:
    # keyword options: accepted by both the old (positional-or-keyword) and new signatures
    return {
        "FixedPoint": lib.FixedPoint(max_iter=n, tol=0.0),
        "Anderson": lib.Anderson(max_iter=n, tol=0.0, m=5),
        "Broyden": lib.Broyden(max_iter=n, tol=0.0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, type=Path, help="src/ of the baseline version")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--cell",
        default="conv",
        choices=["conv", "light", "cheap"],
        help="conv: the MDEQ block (default); light: two 24->24 convs",
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=24)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cpu-memory", default="system", choices=["retain", "system"])
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    ap.add_argument("--out", default="benchmarks/results/solver_overhead_ab.json")
    args = ap.parse_args(argv)
    if args.cpu_memory == "retain":
        retain_cpu_memory()
    base = load_baseline(args.baseline)
    dev = torch.device(args.device)
    sync = dev.type == "cuda"
    torch.manual_seed(0)
    cells = {"conv": lambda: ConvCell(args.channels), "light": lambda: LightCell(args.channels)}
    cell = cells.get(args.cell, CheapCell)().to(dev).eval()
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=dev)
    z0 = torch.zeros_like(x)
    n = args.iters

    def bare() -> None:
        with torch.no_grad():
            z = z0
            for _ in range(n):
                z = cell(z, x)

    def g(z: torch.Tensor) -> torch.Tensor:
        return cell(z, x)

    before, after = make_solvers(base, n), make_solvers(pdq, n)
    fns = {"bare": bare}
    for name in before:
        fns[f"before {name}"] = lambda s=before[name]: s(g, z0)  # type: ignore[operator]
        fns[f"after {name}"] = lambda s=after[name]: s(g, z0)  # type: ignore[operator]
    load_before = loadavg()
    times = interleaved_times(fns, repeats=args.repeats, warmup=1, sync=sync, clock=args.clock)  # type: ignore[arg-type]
    rows, records = [], []
    for stat, pick in (("median", statistics.median), ("min", min)):
        t = {k: pick(v) for k, v in times.items()}
        for name in before:
            b, a, f = t[f"before {name}"], t[f"after {name}"], t["bare"]
            rows.append([name, stat, b * 1e3, a * 1e3, f * 1e3, b / f, a / f, a / b])
            records.append(
                {
                    "solver": name,
                    "statistic": stat,
                    "before_ms": b * 1e3,
                    "after_ms": a * 1e3,
                    "bare_ms": f * 1e3,
                    "ratio_before": b / f,
                    "ratio_after": a / f,
                    "after_over_before": a / b,
                }
            )
    print(
        f"solver overhead, before ({args.baseline}) vs after (this checkout): {args.cell} cell "
        f"batch={args.batch} C={args.channels} {args.size}x{args.size}, {n} iterations, {dev}, "
        f"{torch.get_num_threads()} thread(s), {args.repeats} interleaved repeats, CPU memory: "
        f"{args.cpu_memory}, clock: {args.clock}"
    )
    print_table(
        [
            "solver",
            "stat",
            "before ms",
            "after ms",
            f"{n} x f ms",
            "ratio before",
            "ratio after",
            "after/before",
        ],
        rows,
    )
    write_json(
        args.out,
        {
            "machine": machine(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "args": {**vars(args), "baseline": str(args.baseline)},
            "results": records,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
