"""Question: how close is SHINE's gradient (the forward Broyden inverse estimate reused for the
backward pass) to the exact gradient, beside the phantom gradients, on the paper's synthetic
setting?

Setting (paper Sec. 3, Fig. 1, as ``phantomdeq synthetic``): ``F(h, x) = tanh(W h + U x + b)``
with ``‖W‖₂ = 0.9`` (``pdq.models.SyntheticF``), ``--draws`` independent problems solved as one
batch (float64), loss ``½‖h − y‖²`` with a random target per draw. Exact gradient: ``IFT`` with a
GMRES backward (tol 1e-12) at the fixed point found by ``FixedPoint(max_iter=500, tol=1e-13)``.
For each forward tolerance (``Broyden(max_iter=100, tol)``, full memory) the DEQ output
carries, in turn: ``SHINE()`` (no backward solve), ``UPG(5, 0.5)``, ``NPG(5, 0.5)`` and
``IFT(Broyden(max_iter=20))`` (the synthetic experiment's exact-gradient cross-check), all at
that same forward solution. Reported per method: the cosine to the exact gradient of
``θ = (W, U, b)`` per draw (mean, median, 10th percentile, min) and the forward iterations
(= the rank of Broyden's inverse estimate + 2).

    OMP_NUM_THREADS=1 python benchmarks/shine_cosine.py \
        --out benchmarks/results/shine_cosine_synthetic.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import phantomdeq as pdq
from phantomdeq import diagnostics as D
from phantomdeq.models.synthetic import SyntheticF

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

FORWARD_TOLS = (1e-2, 1e-4, 1e-6, 1e-10)


def estimators() -> dict[str, Any]:
    return {
        "shine": pdq.SHINE(),
        "upg_k5": pdq.UPG(k=5, lam=0.5),
        "npg_k5": pdq.NPG(k=5, lam=0.5),
        "ift_broyden20": pdq.IFT(solver=pdq.Broyden(max_iter=20, tol=0.0), warn_unconverged=False),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=20)
    ap.add_argument("--input-dim", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/shine_cosine_synthetic.json")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    model = SyntheticF(
        args.hidden, args.input_dim, lipschitz=0.9, batch=args.draws, generator=gen
    ).train()
    x = torch.randn(args.draws, args.input_dim, generator=gen, dtype=torch.float64)
    y = torch.randn(args.draws, args.hidden, generator=gen, dtype=torch.float64)
    z0 = torch.zeros(args.draws, args.hidden, dtype=torch.float64)
    params = list(model.parameters())

    def gradient(solver: Any, grad: Any) -> tuple[list[torch.Tensor], pdq.Solution]:
        deq = pdq.DEQ(model, solver=solver, grad=grad)
        h, info = deq(z0, x)
        loss = 0.5 * (h - y).square().sum()
        return list(torch.autograd.grad(loss, params)), info

    exact, ref = gradient(
        pdq.FixedPoint(max_iter=500, tol=1e-13), pdq.IFT(solver=pdq.GMRES(max_iter=60, tol=1e-12))
    )
    if ref.result != "converged":
        raise SystemExit("the reference forward solve did not converge")
    records: list[dict[str, Any]] = []
    for tol in FORWARD_TOLS:
        for name, est in estimators().items():
            g, info = gradient(pdq.Broyden(max_iter=100, tol=tol), est)
            cos = D.per_sample_cosine(g, exact)
            q = torch.quantile(cos, torch.tensor([0.1, 0.5], dtype=cos.dtype))
            rec = {
                "forward_tol": tol,
                "method": name,
                "forward_niter": info.niter,
                "forward_rel_residual_max": float(info.rel_residual.max()),
                "inverse_rank": None if info.inverse is None else info.inverse.rank,
                "cos_mean": float(cos.mean()),
                "cos_median": float(q[1]),
                "cos_p10": float(q[0]),
                "cos_min": float(cos.min()),
            }
            records.append(rec)
    rows = [
        [
            f"{r['forward_tol']:g}",
            r["forward_niter"],
            r["method"],
            f"{r['cos_mean']:.4f}",
            f"{r['cos_median']:.4f}",
            f"{r['cos_p10']:.4f}",
            f"{r['cos_min']:.4f}",
        ]
        for r in records
    ]
    print_table(["fwd tol", "fwd iters", "method", "cos mean", "median", "p10", "min"], rows)
    write_json(
        args.out,
        {
            "question": "cosine of SHINE / UPG / NPG / IFT(Broyden 20) to the exact gradient",
            "setting": {
                "draws": args.draws,
                "hidden": args.hidden,
                "input_dim": args.input_dim,
                "lipschitz": 0.9,
                "activation": "tanh",
                "seed": args.seed,
                "forward": "Broyden(max_iter=100, tol=forward_tol), full memory",
                "exact": "IFT(GMRES(max_iter=60, tol=1e-12)) at FixedPoint(500, 1e-13)",
            },
            "machine": machine(),
            "records": records,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
