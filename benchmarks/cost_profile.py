"""Question: where does the time of one IFT(Broyden) and one UPG(5, 0.5) training step go?

torch.profiler (CPU activities) of one step of each, after one untimed step, on the `phantomdeq cost`
setting (MDEQ-Tiny, CIFAR-shaped random batch, Anderson x22 forward); the IFT backward's
vector-Jacobian products are wrapped in a `VJP(autograd.grad)` range.

    python benchmarks/cost_profile.py [--batch 64] [--methods ift_broyden,upg_k5] [--rows 25]
"""

from __future__ import annotations

import argparse
import sys

from torch.profiler import ProfilerActivity, profile, record_function

import phantomdeq.grad.base as grad_base
from phantomdeq.experiments import cost
from phantomdeq.experiments.measure import Clock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--model", default="mdeq_tiny")
    ap.add_argument("--methods", default="ift_broyden,upg_k5")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    cfg = cost.CostConfig(model=args.model, batch=args.batch, methods=methods, repeats=1, warmup=0)
    bench = cost._Bench(cfg)
    original = grad_base.VJPAt.__call__

    def traced_vjp(self, w):  # type: ignore[no-untyped-def]
        with record_function("VJP(autograd.grad)"):
            return original(self, w)

    grad_base.VJPAt.__call__ = traced_vjp  # type: ignore[method-assign]
    try:
        for name in methods:
            bench.step(name, Clock(bench.dev))
            clock = Clock(bench.dev)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                bench.step(name, clock)
            print(
                f"===== {name}: solve {clock.ms('solve_start', 'solve_end'):.0f} ms, forward "
                f"{clock.ms('start', 'fwd_end'):.0f} ms, backward {clock.ms('fwd_end', 'bwd_end'):.0f} ms"
            )
            print(
                prof.key_averages().table(
                    sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=40
                )
            )
    finally:
        grad_base.VJPAt.__call__ = original  # type: ignore[method-assign]
    return 0


if __name__ == "__main__":
    sys.exit(main())
