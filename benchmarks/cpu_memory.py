"""Question: how much of a CPU solve and training step goes to page faults, with glibc's default
allocation (every multi-MiB tensor a fresh mmap) and with freed memory kept in the process
(``phantomdeq.cpu_memory.retain_cpu_memory()``, what the ``phantomdeq`` command does)?

Each (cell, group, policy) runs in its own fresh process (the setting is process-wide, and
whether glibc's adaptive threshold keeps a block depends on the whole history of the heap, so a
process measures one thing); the policies alternate, ``--rounds`` times each. Group ``solve``:
18 bare f evaluations and the three solvers' 18-evaluation solves (``tol=0``); group ``train``:
the bare loop and one training step (Anderson forward of 18 evaluations + UPG(5, 0.5)
backward). Each process reports the median over ``--repeats`` interleaved calls of wall time,
minor page faults and kernel (system) CPU time; the table gives the median over rounds.

    python benchmarks/cpu_memory.py [--cells light,mdeq] [--threads 2] [--rounds 2]
        [--repeats 5] [--out benchmarks/results/cpu_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
from _common import CELLS, machine, print_table, write_json  # noqa: E402
from phantomdeq.cpu_memory import retain_cpu_memory  # noqa: E402

POLICIES = ("system", "retain")
GROUPS = ("solve", "train")
N_EVALS = 18


def _variants(
    cell: torch.nn.Module, x: torch.Tensor, group: str
) -> dict[str, Callable[[], object]]:
    z0 = torch.zeros_like(x)

    def bare() -> torch.Tensor:
        z = z0
        with torch.no_grad():
            for _ in range(N_EVALS):
                z = cell(z, x)
        return z

    def solve(s: pdq.SolverBase) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return s(lambda z: cell(z, x), z0)

        return run

    deq = pdq.DEQ(
        cell, solver=pdq.Anderson(max_iter=N_EVALS, tol=0.0, m=5), grad=pdq.UPG(k=5, lam=0.5)
    )

    def train_step() -> None:
        cell.zero_grad(set_to_none=True)
        z, _ = deq(z0, x)
        z.square().mean().backward()

    if group == "train":
        return {"bare 18 x f": bare, "train step UPG(5,0.5)": train_step}
    return {
        "bare 18 x f": bare,
        "FixedPoint": solve(pdq.FixedPoint(max_iter=N_EVALS, tol=0.0)),
        "Anderson m=5": solve(pdq.Anderson(max_iter=N_EVALS, tol=0.0, m=5)),
        "Broyden": solve(pdq.Broyden(max_iter=N_EVALS, tol=0.0)),
    }


def child(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    applied = retain_cpu_memory() if args.child == "retain" else False
    out: dict[str, Any] = {
        "policy": args.child,
        "applied": applied,
        "cell": args.cells,
        "group": args.group,
    }
    torch.manual_seed(0)
    cell = CELLS[args.cells](args.channels)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    fns = _variants(cell, x, args.group)
    for fn in fns.values():  # warm-up
        fn()
    rec: dict[str, dict[str, list[float]]] = {
        k: {"ms": [], "faults": [], "sys_ms": []} for k in fns
    }
    for _ in range(args.repeats):
        for k, fn in fns.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            rec[k]["ms"].append((t1 - t0) * 1e3)
            rec[k]["faults"].append(r1.ru_minflt - r0.ru_minflt)
            rec[k]["sys_ms"].append((r1.ru_stime - r0.ru_stime) * 1e3)
    out["calls"] = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in rec.items()}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="light,mdeq")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=24)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    ap.add_argument("--group", choices=GROUPS, default="solve", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/cpu_memory.json")
    args = ap.parse_args(argv)
    bad = [c for c in args.cells.split(",") if c not in CELLS]
    if bad:
        ap.error(f"unknown --cells entries {bad}; allowed {tuple(CELLS)}")
    if args.child:
        print(json.dumps(child(args)))
        return 0
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    base = [sys.executable, __file__, "--threads", str(args.threads)]
    base += ["--batch", str(args.batch), "--channels", str(args.channels)]
    base += ["--size", str(args.size), "--repeats", str(args.repeats)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    cells = args.cells.split(",")
    for r in range(args.rounds):
        for cell in cells:
            for group in GROUPS:
                for policy in POLICIES:
                    cmd = [*base, "--cells", cell, "--group", group, "--child", policy]
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  round {r + 1} done", file=sys.stderr, flush=True)
    rows: list[list[object]] = []
    summary: list[dict[str, Any]] = []
    for cell in cells:
        for group in GROUPS:
            mine = [run for run in runs if run["cell"] == cell and run["group"] == group]
            for variant in mine[0]["calls"]:
                agg = {
                    p: {
                        m: statistics.median(
                            run["calls"][variant][m] for run in mine if run["policy"] == p
                        )
                        for m in ("ms", "faults", "sys_ms")
                    }
                    for p in POLICIES
                }
                speedup = agg["system"]["ms"] / agg["retain"]["ms"]
                summary.append(
                    {"cell": cell, "group": group, "variant": variant, **agg, "speedup": speedup}
                )
                rows.append(
                    [
                        cell,
                        group,
                        variant,
                        agg["system"]["ms"],
                        agg["retain"]["ms"],
                        speedup,
                        int(agg["system"]["faults"]),
                        int(agg["retain"]["faults"]),
                        agg["system"]["sys_ms"],
                        agg["retain"]["sys_ms"],
                    ]
                )
    print(
        f"CPU memory policy: batch {args.batch} x {args.channels} x {args.size}^2, "
        f"{args.threads} threads, median over {args.rounds} rounds of the median of "
        f"{args.repeats} calls; faults = minor page faults per call"
    )
    print_table(
        [
            "cell",
            "process",
            "call",
            "system ms",
            "retain ms",
            "speedup",
            "faults sys",
            "faults ret",
            "kernel ms sys",
            "kernel ms ret",
        ],
        rows,
    )
    for p in POLICIES:
        rss = [run["peak_rss_mib"] for run in runs if run["policy"] == p]
        print(f"peak RSS ({p}): {max(rss):.0f} MiB")
    write_json(
        args.out,
        {
            "machine": {**machine(), "loadavg": os.getloadavg()},
            "args": vars(args),
            "wall_s": time.perf_counter() - t_start,
            "summary": summary,
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
