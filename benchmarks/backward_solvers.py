"""Question: how many vector-Jacobian products does each backward solver need to solve the IFT
backward system ``v = (∂F/∂h)ᵀ v + g`` (paper eq. 4) to a relative tolerance, on MDEQ-Tiny?

Settings (``--cell``):

* ``conv`` (default): the MDEQ-Tiny residual block at one resolution
  (``benchmarks/_common.py`` ``CELLS["mdeq"]``, 24 channels, 32x32), a random injection ``x``
  of standard deviation ``--inj-scale``, loss ``<z, t>`` with a fixed random ``t``. The
  block ends in a GroupNorm, so the injection's size sets the contraction: with ``x ~ N(0, 1)``
  the spectral radius of ``∂F/∂h`` at the fixed point is ≈ 1.0 (power iteration, 40 steps),
  with ``3 N(0, 1)`` (the default) ≈ 0.66;
* ``model``: the whole untrained MDEQ-Tiny (``phantomdeq.models``, seed 0) on a CIFAR-shaped
  random batch (the ``phantomdeq cost`` setting): stem -> DEQ(F) -> head -> cross-entropy. At
  initialisation its fixed point is not attracting (the forward Anderson solve stalls, the
  fixed-point iteration of the backward system diverges): the case the Krylov solvers are for.

One forward solve (Anderson, 60 iterations, tol 1e-5) is shared by every measurement
(replayed); then for each backward solver and tolerance ``tol`` in (1e-4, 1e-6),
``IFT(solver=S(max_iter=cap, tol=tol))`` runs the backward pass (``autograd.grad`` of the loss
w.r.t. the parameters).

Criterion (the same for every solver): per sample, ``‖v - (∂F/∂h)ᵀ v - g‖ / ‖v‖ <= tol`` (the
library's relative residual, ``stop="rel"``), every sample of the batch. Reported per solver:
the products it made (``info.backward.niter``: one VJP per evaluation of the fixed-point map for
FixedPoint/Anderson/Broyden, one per ``op(v)`` for GMRES/BiCGStab, residual re-measurements
included), whether it converged within ``cap``, the backward wall time (median of ``--repeats``),
and the true relative residual of the returned ``v`` (max over the batch), recomputed here with an
independent VJP on a fresh evaluation of ``F`` at ``h*``.

    OMP_NUM_THREADS=1 python benchmarks/backward_solvers.py --cell conv \
        --out benchmarks/results/backward_solvers_conv_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/backward_solvers.py --cell model \
        --out benchmarks/results/backward_solvers_model_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import phantomdeq as pdq
from phantomdeq._state import StateSpec, as_tuple, like
from phantomdeq.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CELLS, machine, print_table, write_json  # noqa: E402

TOLS = (1e-4, 1e-6)


def solvers(cap: int, tol: float) -> dict[str, Any]:
    return {
        "fixed_point": pdq.FixedPoint(max_iter=cap, tol=tol),
        "anderson": pdq.Anderson(max_iter=cap, tol=tol),
        "broyden": pdq.Broyden(max_iter=cap, tol=tol),
        "gmres(restart=20)": pdq.GMRES(max_iter=cap, tol=tol, restart=20),
        "gmres(restart=60)": pdq.GMRES(max_iter=cap, tol=tol, restart=60),
        "bicgstab": pdq.BiCGStab(max_iter=cap, tol=tol),
    }


class Replay:
    """A solver (the ``pdq.Solver`` protocol) returning a solution found before."""

    def __init__(self, sol: pdq.Solution) -> None:
        self.sol = sol

    def __call__(self, g: Any, z0: Any) -> pdq.Solution:
        return self.sol


class Setup:
    """The cell ``f``, its inputs, the shared forward solution and the loss."""

    def __init__(self, cell: str, batch: int, seed: int, inj_scale: float = 3.0) -> None:
        torch.manual_seed(seed)
        if cell == "conv":
            self._conv(batch, seed, inj_scale)
        else:
            self._model(batch, seed)
        fwd = pdq.Anderson(max_iter=60, tol=1e-5)
        self.forward = fwd(lambda z: self.f(z, self.inj), self.z0)
        self.spec = StateSpec.of(self.z0)

    def _conv(self, batch: int, seed: int, inj_scale: float) -> None:
        self.f = CELLS["mdeq"]().train()
        gen = torch.Generator().manual_seed(seed + 1)
        self.inj = inj_scale * torch.randn(batch, 24, 32, 32, generator=gen)
        self.target = torch.randn(batch, 24, 32, 32, generator=gen)
        self.z0 = torch.zeros(batch, 24, 32, 32)
        self.params = [p for p in self.f.parameters() if p.requires_grad]
        self.head = None

    def _model(self, batch: int, seed: int) -> None:
        self.model = build_model(
            "mdeq_tiny",
            num_classes=10,
            in_channels=3,
            solver=pdq.Anderson(max_iter=60, tol=1e-5),
            grad=pdq.OneStep(),
        )
        self.model.train()
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 3, 32, 32, generator=gen)
        self.y = torch.randint(0, 10, (batch,), generator=gen)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        m = self.model
        with torch.no_grad():
            self.inj = m.stem(self.x)
        self.z0 = m.initial_state(self.inj)
        m.f.reset(self.z0, generator=torch.Generator().manual_seed(seed + 2))
        self.f = m.f
        self.head = m.head

    def loss_of(self, z: Any) -> torch.Tensor:
        if self.head is None:
            return (z * self.target).sum() / z.shape[0]
        return F.cross_entropy(self.head(z if isinstance(z, tuple) else (z,)), self.y)

    def backward(self, solver: Any) -> tuple[float, pdq.Solution]:
        est = pdq.IFT(solver=solver, warn_unconverged=False)
        deq = pdq.DEQ(self.f, solver=Replay(self.forward), grad=est)
        z, info = deq(self.z0, self.inj)
        loss = self.loss_of(z)
        t0 = time.perf_counter()
        with contextlib.suppress(pdq.DEQError):  # a diverging solve: recorded as such
            torch.autograd.grad(loss, self.params, allow_unused=True)
        elapsed = time.perf_counter() - t0
        if est.last_backward is None:
            raise RuntimeError("IFT did not record its backward solve")
        return elapsed, est.last_backward

    def true_rel_residual(self, v_flat: torch.Tensor) -> float:
        """max over the batch of ``‖v - Jᵀv - g‖ / ‖v‖`` with a fresh graph of ``F`` at h*."""
        spec = self.spec
        z = tuple(t.detach().requires_grad_() for t in as_tuple(self.forward.z))
        y = as_tuple(self.f(like(spec, z), self.inj))
        y_leaf = tuple(t.detach().requires_grad_() for t in y)
        g_parts = torch.autograd.grad(self.loss_of(like(spec, y_leaf)), y_leaf)
        g = spec.flatten(like(spec, g_parts))
        v = tuple(p.contiguous() for p in as_tuple(spec.unflatten(v_flat)))
        jtv = spec.flatten(like(spec, torch.autograd.grad(y, z, v)))
        r = v_flat - jtv - g
        rel = torch.linalg.vector_norm(r, dim=1) / torch.linalg.vector_norm(v_flat, dim=1)
        return float(rel.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cell", choices=("conv", "model"), default="conv")
    ap.add_argument("--inj-scale", type=float, default=3.0, help="conv: injection std")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cap", type=int, default=200, help="max products per solve")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/backward_solvers_cpu.json")
    args = ap.parse_args()
    setup = Setup(args.cell, args.batch, args.seed, args.inj_scale)
    fwd = setup.forward
    print(
        f"forward: Anderson {fwd.niter} iterations, rel residual max "
        f"{float(fwd.rel_residual.max()):.2e}; state dim {setup.spec.dim}, batch {args.batch}"
    )
    records: list[dict[str, Any]] = []
    for tol in TOLS:
        for name, solver in solvers(args.cap, tol).items():
            times = []
            for _ in range(args.repeats):
                elapsed, back = setup.backward(solver)
                times.append(elapsed)
            rec = {
                "solver": name,
                "repr": repr(solver),
                "tol": tol,
                "vjps": back.niter,
                "converged": back.result == "converged",
                "result": str(back.result),
                "backward_s": statistics.median(times),
                "reported_rel_residual_max": float(back.rel_residual.max()),
                "true_rel_residual_max": setup.true_rel_residual(back.z)
                if back.result != "nonfinite"
                else float("nan"),
            }
            records.append(rec)
            print(
                f"  tol {tol:g} {name}: {rec['vjps']} VJPs, {rec['result']}, "
                f"{rec['backward_s']:.2f} s, true rel residual {rec['true_rel_residual_max']:.2e}",
                flush=True,
            )
    rows = []
    for name in solvers(args.cap, TOLS[0]):
        row: list[object] = [name]
        for tol in TOLS:
            r = next(r for r in records if r["solver"] == name and r["tol"] == tol)
            vjps = str(r["vjps"]) if r["converged"] else f"{r['result']} ({r['vjps']})"
            row += [vjps, r["backward_s"], f"{r['true_rel_residual_max']:.1e}"]
        rows.append(row)
    headers = ["solver"]
    for tol in TOLS:
        headers += [f"VJPs@{tol:g}", f"s@{tol:g}", f"true res@{tol:g}"]
    print_table(headers, rows)
    write_json(
        args.out,
        {
            "question": "VJPs to solve the IFT backward system to a relative tolerance",
            "cell": "mdeq_tiny model" if args.cell == "model" else "CELLS['mdeq'] (ConvCell)",
            "batch": args.batch,
            "inj_scale": args.inj_scale if args.cell == "conv" else None,
            "cap": args.cap,
            "state_dim": setup.spec.dim,
            "forward": {
                "solver": "Anderson(max_iter=60, tol=1e-5)",
                "niter": fwd.niter,
                "rel_residual_max": float(fwd.rel_residual.max()),
            },
            "machine": machine(),
            "records": records,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
