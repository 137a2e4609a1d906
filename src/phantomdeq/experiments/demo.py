"""`phantomdeq demo`: what `make demo` runs.

1. Every gradient estimator on a small DEQ against the dense exact gradient (cosine, relative
   error) and its backward time relative to IFT on a conv DEQ.
2. The paper's synthetic setting (Fig. 1) with quick settings.
3. Training MDEQ-Tiny on the embedded digits data with UPG(5, 0.5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import phantomdeq as pdq
from phantomdeq import diagnostics as D

from .command import Parser, run_command

PROG = "phantomdeq demo"


class _TanhCell(nn.Module):
    """F(z, x) = tanh(W z + U x + b) with ||W||₂ = 0.9 (contractive)."""

    def __init__(self, d: int, dx: int, gen: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(d, d, generator=gen, dtype=torch.float64)
        self.W = nn.Parameter(0.9 * w / torch.linalg.matrix_norm(w, 2))
        self.U = nn.Parameter(torch.randn(d, dx, generator=gen, dtype=torch.float64) / dx**0.5)
        self.b = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class _ConvCell(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4 * c, 3, padding=1)
        self.conv2 = nn.Conv2d(4 * c, c, 3, padding=1)
        self.norm = nn.GroupNorm(4, c)
        with torch.no_grad():
            self.conv2.weight.mul_(0.3)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(z + self.conv2(torch.relu(self.conv1(z))) + x))


def estimators() -> dict[str, pdq.GradientEstimator]:
    return {
        "IFT (FixedPoint backward)": pdq.IFT(solver=pdq.FixedPoint(max_iter=100, tol=1e-10)),
        "IFT (Broyden backward)": pdq.IFT(solver=pdq.Broyden(max_iter=40, tol=1e-10)),
        "UPG k=1 lam=1 (one-step)": pdq.UPG(k=1, lam=1.0),
        "UPG k=5 lam=0.5": pdq.UPG(k=5, lam=0.5),
        "UPG k=5 lam=0.5 ckpt": pdq.UPG(k=5, lam=0.5, checkpoint=True),
        "UPG k=10 lam=1": pdq.UPG(k=10, lam=1.0),
        "NPG k=5 lam=0.5": pdq.NPG(k=5, lam=0.5),
        "NPG k=10 lam=1": pdq.NPG(k=10, lam=1.0),
        "OneStep": pdq.OneStep(),
        "BPTT (60 iterations)": pdq.BPTT(),
    }


def gradient_table(seed: int = 0) -> list[dict[str, float | str]]:
    gen = torch.Generator().manual_seed(seed)
    cell = _TanhCell(48, 16, gen)
    x = torch.randn(6, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 48, generator=gen, dtype=torch.float64)
    wrt = [*cell.parameters(), x]
    solver = pdq.FixedPoint(max_iter=60, tol=1e-12)
    z0 = torch.zeros(6, 48, dtype=torch.float64)
    with torch.no_grad():
        z_star = solver(lambda z: cell(z, x), z0).z
    exact = D.exact_gradient(cell, z_star, (x,), wrt, target)
    rows: list[dict[str, float | str]] = []
    for name, est in estimators().items():
        deq = pdq.DEQ(cell, solver=solver, grad=est)
        z, _ = deq(z0, x)
        grads = torch.autograd.grad((z * target).sum(), wrt)
        rows.append(
            {
                "estimator": name,
                "cosine": D.cosine_similarity(grads, exact),
                "rel_error": D.relative_error(grads, exact),
            }
        )
    return rows


def backward_times(repeats: int = 5, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    cell = _ConvCell(16)
    x = torch.randn(16, 16, 16, 16)
    z0 = torch.zeros_like(x)
    solver = pdq.FixedPoint(max_iter=20, tol=1e-4)
    out: dict[str, list[float]] = {}
    ests = {
        "IFT, FixedPoint 20 it.": pdq.IFT(solver=pdq.FixedPoint(max_iter=20, tol=1e-6)),
        "IFT, Broyden 20 it.": pdq.IFT(solver=pdq.Broyden(max_iter=20, tol=1e-6)),
        "UPG k=5 lam=0.5": pdq.UPG(k=5, lam=0.5),
        "UPG k=5 lam=0.5 ckpt": pdq.UPG(k=5, lam=0.5, checkpoint=True),
        "NPG k=5 lam=0.5": pdq.NPG(k=5, lam=0.5),
        "OneStep": pdq.OneStep(),
    }
    for _ in range(repeats):
        for name, est in ests.items():
            deq = pdq.DEQ(cell, solver=solver, grad=est)
            z, _ = deq(z0, x)
            loss = z.square().mean()
            t0 = time.perf_counter()
            loss.backward()
            out.setdefault(name, []).append(time.perf_counter() - t0)
            cell.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in out.items()}


def run_core_demo() -> None:
    print("== 1. Gradient estimators vs the dense exact gradient (eq. 4), float64 tanh DEQ ==")
    print(f"{'estimator':<28} {'cosine':>9} {'rel.err':>10}")
    for r in gradient_table():
        print(f"{r['estimator']!s:<28} {r['cosine']:9.5f} {r['rel_error']:10.2e}")
    print("\n   Backward time, conv DEQ (batch 16, 16 channels, 16x16, median of 5)")
    times = backward_times()
    ref = times["IFT, FixedPoint 20 it."]
    print(f"{'estimator':<28} {'backward ms':>12} {'vs IFT':>7}")
    for name, t in times.items():
        print(f"{name:<28} {t * 1e3:12.1f} {t / ref:7.2f}")
    print(
        "   (one process, milliseconds per backward pass, measured on whatever else the machine\n"
        "    is running: on a shared machine these ratios change by several times between runs,\n"
        "    UPG even coming out slower than IFT. Not a speed claim: the controlled comparison of\n"
        "    the cost of each gradient is `phantomdeq cost`, see BENCHMARKS.md.)"
    )
    print()


def next_steps(out: Path, *, trained: bool, synthetic: bool) -> str:
    """The demo's closing lines: where its outputs went and what to run next."""
    run = out / "mdeq_tiny_digits"
    lines = ["== Where the outputs went, and what to run next =="]
    if trained:
        lines.append(f"training run: {run}/ (best.pt, last.pt, metrics.jsonl, config.yaml)")
        curves = run / "curves.png"
        plots = "pip install 'phantomdeq[plots]' for them"
        lines.append(f"  its curves: {curves}" if curves.is_file() else f"  no curves: {plots}")
    if synthetic:
        fig = out / "synthetic" / "fig1.png"
        where = f"figure {fig}" if fig.is_file() else "no figure: pip install 'phantomdeq[plots]'"
        lines.append(
            f"synthetic (Fig. 1): {out / 'synthetic'}/ (results.json, summary.json; {where})"
        )
    lines.append("next:")
    if trained:
        lines.append(
            f"  phantomdeq eval {run}   # re-evaluate its best checkpoint, metrics explained"
        )
    lines += [
        "  phantomdeq train --config mdeq_tiny_mnist --set data.root=data/mnist "
        "--set data.download=true --out runs/mnist   # MNIST",
        "  phantomdeq configs   # every shipped config; docs/guides/training.md for the options",
    ]
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(PROG, __doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="directory for the demo's outputs")
    p.add_argument("--skip-train", action="store_true", help="skip the MDEQ training part")
    p.add_argument("--skip-synthetic", action="store_true", help="skip the synthetic experiment")
    return p


def _command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    run_core_demo()
    if not args.skip_synthetic:
        from . import synthetic

        print("== 2. Synthetic setting (paper Fig. 1), quick settings ==")
        synthetic.main(["--out", str(out / "synthetic"), *synthetic.QUICK_ARGS])
        print()
    if not args.skip_train:
        from phantomdeq.train import run_training
        from phantomdeq.train.config import load_config

        print("== 3. MDEQ-Tiny on digits with UPG(5, 0.5) ==")
        cfg = load_config("mdeq_tiny_digits")  # the shipped preset (configs/mdeq_tiny_digits.yaml)
        # the demo is meant to be rerun: it replaces its own previous training run
        res = run_training(cfg, out / "mdeq_tiny_digits", overwrite=True, progress=True)
        print(
            f"MDEQ-Tiny on digits, UPG(5, 0.5): final test accuracy {100 * float(res['test_acc']):.2f} % "
            f"(best {100 * float(res['best_test_acc']):.2f} %), "
            f"{1e3 * float(res['time_per_step_s']):.0f} ms per training step, "
            f"{float(res['fwd_nstep']):.1f} forward solver steps per batch, "
            f"{float(res['time_s']):.0f} s in all"
        )
        print()
    print(next_steps(out, trained=not args.skip_train, synthetic=not args.skip_synthetic))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``phantomdeq demo``: returns 0 on success, 2 for invalid options."""
    return run_command(build_parser(), _command, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
