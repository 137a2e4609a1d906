"""Question: on the *same* fixed-point problems, do phantomdeq's and TorchDEQ 0.1.0's Anderson
solvers need the same number of evaluations of ``f``?

In the time-to-accuracy run (``time_to_accuracy.py``, BENCHMARKS.md) phantomdeq's UPG training
made more forward iterations per step than TorchDEQ's (9.8–10.0 against 8.8). The two runs
start from the same weights and batches but their trajectories part after the first steps, so
that difference can come from the solvers or from where training took each model. This script
separates the two: it trains the time-to-accuracy model (MDEQ-Tiny, 7×7 and 4×4 equilibrium
cell, full MNIST; the same config, seed, data order and optimiser) with phantomdeq UPG(5, 0.5)
for ``--steps`` steps, then records the next ``--solves`` training-mode forward problems
``z = f(z)`` (the cell with its injection, ``z0``) and solves each with both libraries'
Anderson at the training settings (m 5, regularisation 1e-4, relative tolerance 1e-2, at most
20 evaluations). For each solve it reports the evaluations of ``f`` each library made (counted
by wrapping ``f``), the evaluation index of the returned iterate as each library reports it
(``nstep``, mean over samples), and the largest per-sample relative residual of the returned
iterate ``z``, ``‖f(z) − z‖ / ‖z‖``, recomputed here (phantomdeq returns the iterate ``x`` whose
residual it measured, TorchDEQ the image ``f(x)`` of its best iterate).

    python benchmarks/solve_iterations_vs_torchdeq.py --set data.root=PATH/TO/mnist \\
        [--steps 300] [--solves 8] [--threads 2] \\
        [--out benchmarks/results/solve_iterations_vs_torchdeq.json]

Exits 0 with a message when TorchDEQ is not importable.
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
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
import time_to_accuracy as tta  # noqa: E402
from _common import loadavg, machine, print_table, write_json  # noqa: E402
from phantomdeq.train.build import build_model  # noqa: E402
from phantomdeq.train.data import Batches, load_data  # noqa: E402


class Counted:
    """``fn`` that counts its calls."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.fn(*args)


class Recorder:
    """Stands in for the DEQ's solver: records each problem ``(g, z0)`` and solves it with the
    solver it replaces, so that training goes on unchanged."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.problems: list[tuple[Callable[..., Any], Any]] = []

    def __call__(self, g: Callable[..., Any], z0: Any) -> Any:
        self.problems.append((g, z0))
        return self.inner(g, z0)


def flat(
    g: Callable[..., Any], z0: tuple[Tensor, ...]
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``g`` on one ``(B, D)`` tensor (TorchDEQ's solvers take flat states), and the flat ``z0``."""
    b = z0[0].shape[0]
    shapes = [t.shape for t in z0]
    sizes = [t[0].numel() for t in z0]

    def split(z: Tensor) -> tuple[Tensor, ...]:
        parts, at = [], 0
        for size, shape in zip(sizes, shapes, strict=True):
            parts.append(z[:, at : at + size].reshape(shape))
            at += size
        return tuple(parts)

    def gf(z: Tensor) -> Tensor:
        return torch.cat([t.reshape(b, -1) for t in g(split(z))], 1)

    return gf, torch.cat([t.reshape(b, -1) for t in z0], 1)


def worst_rel(gf: Callable[[Tensor], Tensor], z: Tensor) -> float:
    fz = gf(z)
    return float(((fz - z).norm(dim=1) / z.norm(dim=1)).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=300, help="UPG training steps before recording")
    ap.add_argument("--solves", type=int, default=8, help="training solves recorded and compared")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/solve_iterations_vs_torchdeq.json")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.solves < 1:
        ap.error("--steps must be >= 0 and --solves >= 1")
    get_deq = tta._import_torchdeq()
    if get_deq is None:
        print("solve_iterations_vs_torchdeq: skipped — TorchDEQ is not importable")
        return 0
    from torchdeq.solver.anderson import anderson_solver

    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), loadavg()
    conf = argparse.Namespace(
        config=str(tta.BASE_CONFIG), sets=list(args.sets), train_size=None, test_size=None
    )
    cfg = tta._config(conf)
    solver = cfg.solver
    if solver.name != "anderson":
        raise SystemExit(f"solver.name is {solver.name!r}: this script compares Anderson")
    train_ds, _, info = load_data(cfg)
    tta.seed_everything(args.seed)
    state = {k: v.clone() for k, v in build_model(cfg, info=info).state_dict().items()}
    model = tta.build_method("pdq_upg", cfg, info, state, None)
    steps_per_epoch = len(train_ds) // cfg.data.batch_size
    run = tta.Run(
        "pdq_upg",
        model,
        cfg,
        seed=args.seed,
        schedule_steps=steps_per_epoch * cfg.train.epochs,
        n_train=len(train_ds),
    )
    data = Batches(train_ds)
    run.probe(data)
    for _ in range(args.steps):
        run.train_step(data)
    deq = model.deq  # type: ignore[attr-defined]
    recorder = Recorder(deq.solver)
    deq.solver = recorder
    for _ in range(args.solves):
        run.train_step(data)
    deq.solver = recorder.inner

    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for i, (g, z0) in enumerate(recorder.problems):
            gf, zf0 = flat(g, z0)
            ours = Counted(g)
            sol = pdq.Anderson(
                max_iter=solver.max_iter, tol=solver.tol, m=solver.m, lam=solver.lam
            )(ours, z0)
            z_ours = torch.cat([t.reshape(zf0.shape[0], -1) for t in sol.z], 1)
            theirs = Counted(gf)
            z_td, _, td_info = anderson_solver(
                theirs,
                zf0,
                max_iter=tta.td_iters("anderson", solver.max_iter),
                tol=solver.tol,
                stop_mode=solver.stop,
                m=solver.m,
                lam=solver.lam,
            )
            rows.append(
                {
                    "solve": i,
                    "evals_phantomdeq": ours.calls,
                    "evals_torchdeq": theirs.calls,
                    "nstep_phantomdeq": float(sol.nstep.float().mean()),
                    "nstep_torchdeq": float(td_info["nstep"].float().mean()),
                    "worst_rel_phantomdeq": worst_rel(gf, z_ours),
                    "worst_rel_torchdeq": worst_rel(gf, z_td.reshape(zf0.shape)),
                }
            )
    summary = {key: statistics.fmean(r[key] for r in rows) for key in rows[0] if key != "solve"}
    summary["solves_with_equal_evals"] = sum(
        r["evals_phantomdeq"] == r["evals_torchdeq"] for r in rows
    )
    summary["train_fwd_nstep_last_50"] = statistics.fmean(run.fwd_nsteps[-50:])
    print(
        f"{args.solves} training solves after {args.steps} UPG steps (seed {args.seed}); "
        f"Anderson m={solver.m}, lam={solver.lam}, tol={solver.tol} ({solver.stop}), "
        f"at most {solver.max_iter} evaluations"
    )
    print_table(
        [
            "solve",
            "evals ours",
            "evals TorchDEQ",
            "nstep ours",
            "nstep TorchDEQ",
            "worst rel ours",
            "worst rel TorchDEQ",
        ],
        [
            [
                r["solve"],
                r["evals_phantomdeq"],
                r["evals_torchdeq"],
                r["nstep_phantomdeq"],
                r["nstep_torchdeq"],
                f"{r['worst_rel_phantomdeq']:.2e}",
                f"{r['worst_rel_torchdeq']:.2e}",
            ]
            for r in rows
        ],
    )
    print(
        f"mean evaluations: phantomdeq {summary['evals_phantomdeq']:.2f}, "
        f"TorchDEQ {summary['evals_torchdeq']:.2f}; equal in "
        f"{summary['solves_with_equal_evals']} of {len(rows)} solves"
    )
    write_json(
        args.out,
        {
            "question": __doc__.splitlines()[0],
            "machine": {**machine(), "load_before": load0, "loadavg_end": loadavg()},
            "args": vars(args),
            "config_solver": {
                "max_iter": solver.max_iter,
                "tol": solver.tol,
                "stop": solver.stop,
                "m": solver.m,
                "lam": solver.lam,
            },
            "rows": rows,
            "summary": summary,
            "wall_s": time.perf_counter() - t0,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
