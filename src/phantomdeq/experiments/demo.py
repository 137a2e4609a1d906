"""`phantomdeq demo`: what `make demo` runs.

1. Every gradient estimator on a small DEQ against the dense exact gradient (cosine, relative
   error), then whole training steps timed against IFT with IFT's backward iterations beside
   them: MDEQ-Tiny (many backward iterations) and a strongly contractive conv cell (few).
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


#: the estimators timed in part 1 (whole training steps), IFT first: the reference
STEP_ESTIMATORS = ("IFT", "UPG k=5 lam=0.5", "NPG k=5 lam=0.5", "OneStep")


def _step_estimators(ift_tol: float) -> dict[str, pdq.GradientEstimator]:
    ift = pdq.IFT(solver=pdq.Broyden(max_iter=30, tol=ift_tol), warn_unconverged=False)
    ests: list[pdq.GradientEstimator] = [
        ift,
        pdq.UPG(k=5, lam=0.5),
        pdq.NPG(k=5, lam=0.5),
        pdq.OneStep(),
    ]
    return dict(zip(STEP_ESTIMATORS, ests))


class _StepSetting:
    """A model, a batch and a forward solver: ``step(est)`` runs one training step (forward,
    loss, backward) and returns its times and, for IFT, its backward solve's iterations."""

    def __init__(self, name: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.name = name
        self.solver: pdq.Anderson | pdq.FixedPoint
        if name == "mdeq_tiny":
            from phantomdeq.models import build_model

            # the demo recipe's model and forward solver (configs/mdeq_tiny_digits.yaml)
            self.solver = pdq.Anderson(max_iter=8, tol=1e-3)
            self.model = build_model(
                "mdeq_tiny", num_classes=10, in_channels=1, solver=self.solver, grad=pdq.OneStep()
            )
            self.model.train()
            self.x = torch.randn(64, 1, 8, 8)
            self.y = torch.randint(0, 10, (64,))
            self.ift_tol = 1e-3  # the forward solve's tolerance
        else:
            self.solver = pdq.FixedPoint(max_iter=20, tol=1e-4)
            self.conv = _ConvCell(16)
            self.x = torch.randn(8, 16, 16, 16)
            self.ift_tol = 1e-6
        self.estimators = _step_estimators(self.ift_tol)

    def params(self) -> list[nn.Parameter]:
        return list((self.model if self.name == "mdeq_tiny" else self.conv).parameters())

    def step(self, est: pdq.GradientEstimator) -> tuple[float, float, int | None, bool]:
        for p in self.params():
            p.grad = None
        t0 = time.perf_counter()
        if self.name == "mdeq_tiny":
            model = self.model
            inj = model.stem(self.x)
            z0 = model.initial_state(inj)
            model.f.reset(z0, generator=torch.Generator().manual_seed(2))
            z, _ = pdq.DEQ(model.f, solver=self.solver, grad=est)(z0, inj)
            logits = model.head(z if isinstance(z, tuple) else (z,))
            loss = nn.functional.cross_entropy(logits, self.y)
        else:
            z, _ = pdq.DEQ(self.conv, solver=self.solver, grad=est)(
                torch.zeros_like(self.x), self.x
            )
            loss = z.square().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        bwd = est.last_backward if isinstance(est, pdq.IFT) else None
        if bwd is None:
            return t2 - t0, t2 - t1, None, False
        return t2 - t0, t2 - t1, int(bwd.niter), bwd.result == "converged"


def training_step_times(setting: str, repeats: int = 3, seed: int = 0) -> list[dict[str, object]]:
    """Whole training steps (forward solve, estimator, loss, backward) of each of
    :data:`STEP_ESTIMATORS` in ``setting``: ``"mdeq_tiny"`` (MDEQ-Tiny at 8x8, batch 64, the
    demo recipe's Anderson forward; IFT's backward Broyden solve to the forward's tol 1e-3, at
    most 30 iterations) or ``"contractive"`` (a strongly contractive conv cell, batch 8, IFT's
    backward to 1e-6). Medians of ``repeats`` rounds after one warm-up round, the order
    rotating each round. Rows: ``estimator``, ``step_ms``, ``backward_ms``, ``ift_iters``
    (IFT's backward solve iterations, median; None for the others), ``ift_converged``
    (whether every IFT backward solve reached its tol; None for the others), ``vs_ift`` (step
    time relative to IFT's)."""
    st = _StepSetting(setting, seed)
    names = list(st.estimators)
    samples: dict[str, list[tuple[float, float, int | None, bool]]] = {n: [] for n in names}
    for r in range(repeats + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            got = st.step(st.estimators[name])
            if r:
                samples[name].append(got)
    rows: list[dict[str, object]] = []
    for name in names:
        steps = [s[0] for s in samples[name]]
        iters = [s[2] for s in samples[name] if s[2] is not None]
        rows.append(
            {
                "estimator": name,
                "step_ms": 1e3 * statistics.median(steps),
                "backward_ms": 1e3 * statistics.median(s[1] for s in samples[name]),
                "ift_iters": int(statistics.median(iters)) if iters else None,
                "ift_converged": all(s[3] for s in samples[name]) if iters else None,
            }
        )
    ref = float(rows[0]["step_ms"])  # type: ignore[arg-type]
    for row in rows:
        row["vs_ift"] = float(row["step_ms"]) / ref  # type: ignore[arg-type]
    return rows


def speed_verdict(rows: Sequence[dict[str, object]], estimator: str = "UPG k=5 lam=0.5") -> str:
    """One sentence on whether ``estimator``'s training step was faster than IFT's in ``rows``
    (from :func:`training_step_times`), naming IFT's backward iterations."""
    ift = rows[0]
    row = next(r for r in rows if r["estimator"] == estimator)
    ratio = float(row["vs_ift"])  # type: ignore[arg-type]
    iters = ift["ift_iters"]
    if ratio < 1.0:
        capped = "" if ift["ift_converged"] else " (its cap, short of its tol)"
        return (
            f"{estimator} was faster: its step took {ratio:.2f}x IFT's, whose backward solve "
            f"ran {iters} iterations{capped}."
        )
    return (
        f"{estimator} was NOT faster here: its step took {ratio:.2f}x IFT's, whose backward "
        f"solve needed only {iters} iterations."
    )


def run_core_demo(repeats: int = 3) -> None:
    print("== 1. Gradient estimators vs the dense exact gradient (eq. 4), float64 tanh DEQ ==")
    print(f"{'estimator':<28} {'cosine':>9} {'rel.err':>10}")
    for r in gradient_table():
        print(f"{r['estimator']!s:<28} {r['cosine']:9.5f} {r['rel_error']:10.2e}")
    settings = (
        ("mdeq_tiny", "MDEQ-Tiny (8x8 inputs, batch 64, Anderson forward)"),
        ("contractive", "strongly contractive conv cell (batch 8, 16 channels, 16x16)"),
    )
    for key, title in settings:
        print(f"\n   Whole training step, {title}: median of {repeats}, this machine, now")
        rows = training_step_times(key, repeats=repeats)
        print(
            f"{'estimator':<28} {'step ms':>9} {'backward ms':>12} {'vs IFT':>7} {'IFT bwd it.':>12}"
        )
        for row in rows:
            it = "" if row["ift_iters"] is None else str(row["ift_iters"])
            it += "" if row["ift_converged"] in (None, True) else " (max)"
            print(
                f"{row['estimator']!s:<28} {float(row['step_ms']):9.1f} "  # type: ignore[arg-type]
                f"{float(row['backward_ms']):12.1f} {float(row['vs_ift']):7.2f} {it:>12}"  # type: ignore[arg-type]
            )
        print("   " + speed_verdict(rows))
    print(
        "   The phantom gradient saves time when IFT's backward solve needs many iterations\n"
        "   (each one a vector-Jacobian product); on a cell whose backward solve converges in a\n"
        "   few, IFT is as cheap or cheaper. Controlled measurements: `phantomdeq cost`,\n"
        "   BENCHMARKS.md."
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
