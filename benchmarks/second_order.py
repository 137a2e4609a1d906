"""Question: does second-order support cost anything on the first-order IFT path, and what does a
gradient-penalty step cost relative to a plain training step?

Setting: MDEQ-Tiny on a CIFAR-shaped random batch (the `phantomdeq cost` setting): stem ->
DEQ(F) -> head -> cross-entropy. Forward: Anderson, 22 iterations (tol 0); IFT backward: Broyden,
20 iterations (tol 0), i.e. fixed budgets so that every variant does the same solver work.

1. First-order IFT backward (`loss.backward()` after an untimed forward) with this tree's
   phantomdeq against a baseline copy of the package from before the change (``--baseline``,
   loaded as a second package, e.g. ``git archive 61e5772 src | tar -x -C /tmp/pdq_base``), the
   same weights, data and dropout masks; interleaved medians.
2. One training step, plain (forward + ``loss.backward()``) vs with a gradient penalty (forward,
   ``g = autograd.grad(loss, params, create_graph=True)``, ``(loss + 0.1 ||g||²).backward()``),
   for IFT, UPG(5, 0.5) and NPG(5, 0.5); interleaved medians, ratio penalty / plain.

    OMP_NUM_THREADS=1 python benchmarks/second_order.py --baseline /tmp/pdq_base/src/phantomdeq \
        --out benchmarks/results/second_order_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

import phantomdeq as pdq
from phantomdeq.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    interleaved_medians,
    load_baseline,
    machine,
    print_table,
    write_json,
)


class Setup:
    def __init__(self, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = build_model(
            "mdeq_tiny",
            num_classes=10,
            in_channels=3,
            solver=pdq.Anderson(max_iter=22, tol=0.0),
            grad=pdq.OneStep(),
        )
        self.model.train()
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 3, 32, 32, generator=gen)
        self.y = torch.randint(0, 10, (batch,), generator=gen)
        self.seed = seed
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, deq: Any) -> torch.Tensor:
        m = self.model
        inj = m.stem(self.x)
        z0 = m.initial_state(inj)
        m.f.reset(z0, generator=torch.Generator().manual_seed(self.seed + 2))
        z, _ = deq(z0, inj)
        return F.cross_entropy(m.head(z if isinstance(z, tuple) else (z,)), self.y)


def make_deq(lib: ModuleType, setup: Setup, grad: Any) -> Any:
    return lib.DEQ(setup.model.f, solver=lib.Anderson(max_iter=22, tol=0.0), grad=grad)


def ift(lib: ModuleType) -> Any:
    solver = lib.Broyden(max_iter=20, tol=0.0)
    if lib is pdq:  # a fixed budget (tol 0) is meant not to converge
        return lib.IFT(solver=solver, warn_unconverged=False)
    return lib.IFT(solver=solver)


class SmallSetup:
    """A small MLP cell (d=64, batch 32, float32) where per-call overheads would show."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.W = torch.nn.Parameter(0.5 * torch.randn(64, 64, generator=gen) / 8.0)
        self.U = torch.nn.Parameter(torch.randn(64, 64, generator=gen) / 8.0)
        self.x = torch.randn(32, 64, generator=gen)

    def deq(self, lib: ModuleType) -> Any:
        return lib.DEQ(
            _MLP(self.W, self.U), solver=lib.Anderson(max_iter=22, tol=0.0), grad=ift(lib)
        )

    def grads(self, deq: Any) -> list[torch.Tensor]:
        z, _ = deq(torch.zeros(32, 64), self.x)
        return list(torch.autograd.grad(z.square().sum(), [self.W, self.U]))


class _MLP(torch.nn.Module):
    def __init__(self, W: torch.nn.Parameter, U: torch.nn.Parameter) -> None:
        super().__init__()
        self.W, self.U = W, U

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T)


def compare(fn: Any, names: list[str], repeats: int) -> dict[str, Any]:
    """``fn(name) -> (seconds, grads)``; one warm-up round, then ``repeats`` rounds alternating
    the order. Reports medians, the median and quartiles of the per-round ratio
    this/baseline (robust to load drift on a shared machine) and the gradient difference."""
    times: dict[str, list[float]] = {k: [] for k in names}
    grads: dict[str, list[torch.Tensor]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(repeats + 1):
            for name in names if r % 2 == 0 else list(reversed(names)):
                dt, grads[name] = fn(name)
                if r > 0:
                    times[name].append(dt)
    ratios = sorted(a / b for a, b in zip(times[names[1]], times[names[0]]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    diff = max(
        float((a - b).norm() / b.norm().clamp_min(1e-30))
        for a, b in zip(grads[names[1]], grads[names[0]])
    )
    return {
        "times_s": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_median": statistics.median(ratios),
        "ratio_q25": q[0],
        "ratio_q75": q[2],
        "max_relative_gradient_difference": diff,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="path of the baseline phantomdeq package")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--small-repeats", type=int, default=200)
    ap.add_argument("--step-repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/second_order_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = load_baseline(args.baseline)
    setup = Setup(args.batch)

    # ---------------------------------------------------------------- 1. first-order backward
    libs = {"baseline": base, "this tree": pdq}
    mdeq = {k: make_deq(lib, setup, ift(lib)) for k, lib in libs.items()}

    def mdeq_round(name: str) -> tuple[float, list[torch.Tensor]]:
        setup.model.zero_grad(set_to_none=True)
        loss = setup.loss(mdeq[name])  # untimed forward
        t0 = time.perf_counter()
        loss.backward()
        dt = time.perf_counter() - t0
        return dt, [p.grad.clone() for p in setup.params]

    small = SmallSetup()
    small_deq = {k: small.deq(lib) for k, lib in libs.items()}

    def small_round(name: str) -> tuple[float, list[torch.Tensor]]:
        t0 = time.perf_counter()  # forward (attach included) + backward
        gr = small.grads(small_deq[name])
        return time.perf_counter() - t0, gr

    first: dict[str, Any] = {}
    for label, fn, reps in (
        (f"MDEQ-Tiny b{args.batch}, backward", mdeq_round, args.repeats),
        ("MLP cell d64 b32, forward+backward", small_round, args.small_repeats),
    ):
        first[label] = compare(fn, list(libs), reps)
    print("1. first-order IFT, baseline package vs this tree (interleaved rounds)")
    print_table(
        ["case", "baseline median ms", "this median ms", "median of per-round ratios", "grad diff"],
        [
            [
                k,
                f"{r['median_s']['baseline'] * 1e3:.2f}",
                f"{r['median_s']['this tree'] * 1e3:.2f}",
                f"{r['ratio_median']:.3f} [{r['ratio_q25']:.3f}, {r['ratio_q75']:.3f}]",
                f"{r['max_relative_gradient_difference']:.0e}",
            ]
            for k, r in first.items()
        ],
    )

    # ---------------------------------------------------------------- 2. penalty step
    estimators = {
        "IFT (Broyden x20)": lambda: ift(pdq),
        "UPG(5, 0.5)": lambda: pdq.UPG(k=5, lam=0.5),
        "NPG(5, 0.5)": lambda: pdq.NPG(k=5, lam=0.5),
    }
    step_rows = []
    steps: dict[str, dict[str, float]] = {}
    for label, make in estimators.items():
        deq = make_deq(pdq, setup, make())

        def plain(deq: Any = deq) -> None:
            setup.model.zero_grad(set_to_none=True)
            setup.loss(deq).backward()

        def penalty(deq: Any = deq) -> None:
            setup.model.zero_grad(set_to_none=True)
            loss = setup.loss(deq)
            g = torch.autograd.grad(loss, setup.params, create_graph=True)
            (loss + 0.1 * sum(t.square().sum() for t in g)).backward()

        m = interleaved_medians({"plain": plain, "penalty": penalty}, repeats=args.step_repeats)
        steps[label] = {"plain_s": m["plain"], "penalty_s": m["penalty"]}
        step_rows.append(
            [
                label,
                f"{m['plain'] * 1e3:.0f}",
                f"{m['penalty'] * 1e3:.0f}",
                f"{m['penalty'] / m['plain']:.2f}",
            ]
        )
    print(f"2. training step with a gradient penalty, MDEQ-Tiny batch {args.batch}")
    print_table(["estimator", "plain ms", "penalty ms", "penalty / plain"], step_rows)

    write_json(
        args.out,
        {
            "question": "first-order IFT backward cost before/after second-order support; "
            "gradient-penalty step cost",
            "setting": {
                "model": "mdeq_tiny",
                "batch": args.batch,
                "forward": "Anderson x22 tol 0",
                "ift_backward": "Broyden x20 tol 0",
                "repeats": args.repeats,
                "step_repeats": args.step_repeats,
            },
            "machine": machine(),
            "first_order": first,
            "penalty_step": steps,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
