"""Question: how much does each forward solver cost beyond the network evaluations themselves?

Ratio = (time of a solve with a fixed budget of N iterations) / (time of N bare f evaluations),
measured side by side (alternating) in one process. Goals: <= 1.10 FixedPoint, <= 1.15 Anderson
and Broyden. Default: conv cell, batch 64, 24 channels, 32x32, 18 iterations, CPU.

    python benchmarks/solver_overhead.py [--device cpu|cuda] [--repeats 7] [--out benchmarks/results/solver_overhead.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
from _common import ConvCell, interleaved_medians, machine, print_table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=24)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/solver_overhead.json")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = dev.type == "cuda"
    torch.manual_seed(0)
    cell = ConvCell(args.channels).to(dev).eval()
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

    solvers = {
        "FixedPoint": pdq.FixedPoint(max_iter=n, tol=0.0),
        "Anderson": pdq.Anderson(max_iter=n, tol=0.0, m=5),
        "Broyden": pdq.Broyden(max_iter=n, tol=0.0),
    }
    fns = {"bare": bare}
    for name, s in solvers.items():
        fns[name] = lambda s=s: s(g, z0)
    med = interleaved_medians(fns, repeats=args.repeats, warmup=1, sync=sync)
    goals = {"FixedPoint": 1.10, "Anderson": 1.15, "Broyden": 1.15}
    rows = []
    records = []
    for name in solvers:
        ratio = med[name] / med["bare"]
        rows.append(
            [
                name,
                med[name] * 1e3,
                med["bare"] * 1e3,
                ratio,
                goals[name],
                "yes" if ratio <= goals[name] else "NO",
            ]
        )
        records.append(
            {
                "solver": name,
                "solve_ms": med[name] * 1e3,
                "bare_ms": med["bare"] * 1e3,
                "ratio": ratio,
                "goal": goals[name],
            }
        )
    print(
        f"solver overhead: conv cell batch={args.batch} C={args.channels} {args.size}x{args.size}, {n} iterations, {dev}"
    )
    print_table(["solver", "solve ms", f"{n} x f ms", "ratio", "goal", "met"], rows)
    write_json(args.out, {"machine": machine(), "args": vars(args), "results": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
