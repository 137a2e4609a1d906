"""Does ``torch.compile`` of a whole DEQ speed up a training step, for UPG and for IFT?

One training step (forward, mean-square loss, backward) of a DEQ around the light cell (two 3x3
convolutions, 16 channels, 16x16, batch 8), Anderson forward and -- for IFT -- a FixedPoint
backward, 12 iterations each, tol 0: eager against ``torch.compile(deq)`` (inductor), timed in
interleaved rounds in one process. Beside the times: the graphs dynamo built, whether the
steps after the first compiled anything new (recompiles), and the largest relative difference
of the compiled gradients from the eager ones.

``--baseline DIR`` adds the same two compiled steps with another version of the package
(``git archive <rev> src | tar -x -C DIR``) loaded beside this one, for a before/after in one
run.

    python benchmarks/compile_training.py --threads 2 --repeats 9 \\
        [--baseline /tmp/base/src] --out benchmarks/results/compile_training_cpu.json

Compilation takes minutes per module on two loaded cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import phantomdeq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    LightCell,
    interleaved_times,
    load_baseline,
    loadavg,
    machine,
    print_table,
    write_json,
)

CHANNELS, SIZE, BATCH, ITERS = 16, 16, 8, 12


def make_deq(pkg: ModuleType, estimator: str, seed: int) -> tuple[Any, torch.nn.Module]:
    torch.manual_seed(seed)
    cell = LightCell(CHANNELS)
    if estimator == "upg":
        grad = pkg.UPG(k=5, lam=0.5)
    else:
        grad = pkg.IFT(solver=pkg.FixedPoint(max_iter=ITERS, tol=0.0), warn_unconverged=False)
    deq = pkg.DEQ(cell, solver=pkg.Anderson(max_iter=ITERS, tol=0.0), grad=grad)
    return deq, cell


def step_fn(deq: Any, cell: torch.nn.Module, x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    def step() -> list[torch.Tensor]:
        cell.zero_grad(set_to_none=True)
        z, _ = deq(torch.zeros_like(x), x)
        z.square().mean().backward()
        return [p.grad.detach().clone() for p in cell.parameters() if p.grad is not None]

    return step


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((u - v).pow(2).sum()) for u, v in zip(a, b, strict=True))
    den = sum(float(v.pow(2).sum()) for v in b)
    return (num / max(den, 1e-300)) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--estimators", default="upg,ift")
    ap.add_argument("--baseline", default=None, help="src folder of another package version")
    ap.add_argument("--out", default="benchmarks/results/compile_training_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    packages: dict[str, ModuleType] = {"new": phantomdeq}
    if args.baseline:
        packages["base"] = load_baseline(args.baseline)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    fns: dict[str, Callable[[], object]] = {}
    info: dict[str, dict[str, object]] = {}
    for est in args.estimators.split(","):
        deq, cell = make_deq(phantomdeq, est, seed=0)
        eager = step_fn(deq, cell, x)
        reference = eager()
        fns[f"{est}/eager"] = eager
        for tag, pkg in packages.items():
            deq_c, cell_c = make_deq(pkg, est, seed=0)
            torch._dynamo.reset()
            counters.clear()
            compiled = step_fn(torch.compile(deq_c), cell_c, x)
            grads = compiled()
            built = int(counters["stats"]["unique_graphs"])
            compiled()
            compiled()
            info[f"{est}/compile_{tag}"] = {
                "graphs": built,
                "graph_breaks": int(sum(counters["graph_break"].values())),
                "recompiled_graphs": int(counters["stats"]["unique_graphs"]) - built,
                "grad_rel_diff_vs_eager": rel_diff(grads, reference),
            }
            fns[f"{est}/compile_{tag}"] = compiled
    load_before = loadavg()
    times = interleaved_times(fns, repeats=args.repeats, warmup=1)
    medians = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for key, med in medians.items():
        est = key.split("/")[0]
        ratio = med / medians[f"{est}/eager"]
        extra = info.get(key, {})
        info.setdefault(key, {}).update({"median_ms": med * 1e3, "ratio_to_eager": ratio})
        rows.append(
            [
                key,
                med * 1e3,
                ratio,
                extra.get("graphs", ""),
                extra.get("recompiled_graphs", ""),
                extra.get("grad_rel_diff_vs_eager", ""),
            ]
        )
    print_table(["step", "ms", "/eager", "graphs", "recompiled", "grad rel diff"], rows)
    write_json(
        args.out,
        {
            "question": "torch.compile of a whole DEQ training step, UPG and IFT, against eager",
            "cell": f"LightCell({CHANNELS}), batch {BATCH} x {CHANNELS} x {SIZE} x {SIZE}",
            "solvers": f"Anderson forward, FixedPoint backward (IFT), {ITERS} iterations, tol 0",
            "machine": machine(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "repeats": args.repeats,
            "baseline": args.baseline,
            "results": info,
            "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
        },
    )


if __name__ == "__main__":
    main()
