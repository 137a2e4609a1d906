"""Adaptive phantom gradients (``UPG(k="auto")`` / ``NPG(k="auto")``) against fixed k on the
paper's synthetic setting (Sec. 3, Fig. 1): cosine to the exact gradient versus VJPs.

Setting: the Fig. 1 draws (``SyntheticF``, L_h = 0.9, tanh, d_h = 20, d_x = 10, loss
``½‖h − y‖²``), ``h*`` by fixed-point iteration stopped at ``‖h − F(h)‖/‖h‖ < 1e-5`` (at most 100
updates), as in the paper. Exact gradient: IFT with a tight Broyden backward after a tight
(1e-13) forward solve. Fixed k: every draw gets ``UPG(k, λ)`` / ``NPG(k, λ)``. Adaptive: the
draws are split into consecutive batches of ``--batch`` draws (one batch = one training step;
the stopping test holds for all samples of a batch) and each batch chooses its own k.

Cost: VJPs through F per step: ``k`` for UPG (backward through k steps; the forward unroll
also evaluates F k times) and for NPG (k − 1 series products and the final product through
``F(h*)`` to θ). A method *reaches* a target cosine c when at least 90 % of the draws have a
cosine >= c (the 10th percentile is >= c). For each target and method: the smallest fixed k
that reaches it, and the adaptive ``tol`` (of a grid) with the fewest mean VJPs that reaches it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptive_synthetic.py \
        --out benchmarks/results/adaptive_synthetic.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import phantomdeq as pdq
from phantomdeq import diagnostics as D
from phantomdeq.models.synthetic import SyntheticF

TARGETS = (0.9, 0.99, 0.999, 0.9999)
TOLS = (0.3, 0.1, 0.05, 0.03, 0.02, 0.01, 5e-3, 3e-3, 2e-3, 1e-3, 5e-4, 3e-4, 1e-4, 3e-5, 1e-5)


class _Given:
    """A solver returning a precomputed solution (every estimator sees the same ``h*``)."""

    def __init__(self, sol: pdq.Solution) -> None:
        self.sol = sol

    def __call__(self, g: Any, z0: Any) -> pdq.Solution:
        return self.sol


def _subset(sol: pdq.Solution, idx: slice) -> pdq.Solution:
    z = sol.z
    if not isinstance(z, Tensor):
        raise TypeError("tensor state expected")
    return pdq.Solution(
        z=z[idx],
        nstep=sol.nstep[idx],
        residual=sol.residual[idx],
        abs_residual=sol.abs_residual[idx],
        rel_residual=sol.rel_residual[idx],
        converged=sol.converged[idx],
        result=sol.result,
        tol=sol.tol,
        stop=sol.stop,
    )


def _sub_model(model: SyntheticF, idx: slice, n: int) -> SyntheticF:
    sub = SyntheticF(model.hidden, model.input_dim, batch=n, dtype=torch.float64)
    with torch.no_grad():
        for name, p in sub.named_parameters():
            p.copy_(dict(model.named_parameters())[name][idx])
    return sub


def _grad(model, x, target, sol, est) -> Tensor:
    deq = pdq.DEQ(model, solver=_Given(sol), grad=est).train()
    z, _ = deq(torch.zeros_like(x[:, :1]).expand(-1, model.hidden).contiguous(), x)
    params = list(model.parameters())
    grads = torch.autograd.grad(0.5 * (z - target).pow(2).sum(), params)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def _auto_vjps(method: str, ks: np.ndarray) -> float:
    """Mean vector-Jacobian products of an adaptive step with chosen ``ks`` (per draw): NPG
    ``k`` (``k - 1`` series products and the product through ``F(h*)``), UPG ``2k - 1``
    (``k - 1`` products deciding ``k``, then the backward of the ``k`` recomputed steps)."""
    return float((2 * ks - 1).mean()) if method == "upg" else float(ks.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1, help="draws per adaptive step")
    ap.add_argument("--lams", default="0.5,1.0")
    ap.add_argument("--k-max", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive_synthetic.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    dt = torch.float64
    n, hidden, dx = args.draws, 20, 10
    model = SyntheticF(hidden, dx, lipschitz=0.9, batch=n, generator=gen, dtype=dt)
    x = torch.randn(n, dx, generator=gen, dtype=dt)
    target = torch.tanh(torch.randn(n, hidden, generator=gen, dtype=dt))
    z0 = torch.zeros(n, hidden, dtype=dt)
    fwd = pdq.FixedPoint(max_iter=101, tol=1e-5, freeze_converged=True)
    sol = fwd(lambda h: model(h, x), z0)
    tight = pdq.FixedPoint(max_iter=2000, tol=1e-13)(lambda h: model(h, x), z0)
    ift = pdq.IFT(solver=pdq.Broyden(max_iter=60, tol=1e-13))
    exact = _grad(model, x, target, tight, ift)
    lams = [float(v) for v in args.lams.split(",")]
    slices = [slice(a, min(a + args.batch, n)) for a in range(0, n, args.batch)]
    subs = [_sub_model(model, idx, idx.stop - idx.start) for idx in slices]
    rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    for method in ("upg", "npg"):
        cls = pdq.UPG if method == "upg" else pdq.NPG
        for lam in lams:
            fixed: dict[int, np.ndarray] = {}
            for k in range(1, args.k_max + 1):
                g = _grad(model, x, target, sol, cls(k=k, lam=lam))
                fixed[k] = D.per_sample_cosine(g, exact).numpy()
                rows.append(_row(method, lam, "fixed", k, None, fixed[k], np.full(n, k)))
            adaptive: dict[float, tuple[np.ndarray, np.ndarray]] = {}
            for tol in TOLS:
                cos, ks = np.zeros(n), np.zeros(n)
                for idx, sub in zip(slices, subs):
                    est = cls(k="auto", lam=lam, tol=tol, k_max=args.k_max)
                    g = _grad(sub, x[idx], target[idx], _subset(sol, idx), est)
                    cos[idx] = D.per_sample_cosine(g, exact[idx]).numpy()
                    ks[idx] = est.last_k
                adaptive[tol] = (cos, ks)
                rows.append(_row(method, lam, "auto", None, tol, cos, ks))
            for c in TARGETS:
                k_fixed = next((k for k in fixed if np.percentile(fixed[k], 10) >= c), None)
                # UPG(k="auto") decides k in its backward pass on the series at h*: k - 1
                # products for the decision, then the k recomputed steps' backward
                ok = [(_auto_vjps(method, ks), tol) for tol, (cos, ks) in adaptive.items()]
                ok = [(vjp, tol) for vjp, tol in ok if np.percentile(adaptive[tol][0], 10) >= c]
                best = min(ok) if ok else None
                table.append(
                    {
                        "method": method,
                        "lam": lam,
                        "target_cos_p10": c,
                        "fixed_k": k_fixed,
                        "fixed_vjps": k_fixed,
                        "auto_tol": None if best is None else best[1],
                        "auto_mean_vjps": None if best is None else float(best[0]),
                        "auto_mean_k": None if best is None else float(adaptive[best[1]][1].mean()),
                        "auto_max_k": None if best is None else int(adaptive[best[1]][1].max()),
                        "ratio": None
                        if best is None or k_fixed is None
                        else float(best[0]) / k_fixed,
                    }
                )
    out = {
        "setting": {
            "draws": n,
            "hidden": hidden,
            "input_dim": dx,
            "lipschitz": 0.9,
            "forward": "FixedPoint, rel tol 1e-5, <= 100 updates (Fig. 1)",
            "forward_rel_residual_max": float(sol.rel_residual.max()),
            "exact": "IFT(Broyden tol 1e-13) at a 1e-13 fixed point",
            "adaptive_batch": args.batch,
            "k_max": args.k_max,
            "reach": "10th percentile of per-draw cosine >= target",
            "vjps": "k for UPG(k) and NPG(k); for auto the mean over draws of the chosen k "
            "(NPG) or 2k - 1 (UPG: k - 1 decision products, then k steps' backward)",
        },
        "table": table,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(
        f"{'method':6} {'lam':>4} {'target':>7} {'fixed k':>8} {'auto tol':>9} "
        f"{'auto VJPs':>10} {'auto max k':>10} {'ratio':>6}"
    )
    for r in table:
        print(
            f"{r['method']:6} {r['lam']:4g} {r['target_cos_p10']:7g} {_s(r['fixed_k']):>8} "
            f"{_s(r['auto_tol']):>9} {_s(r['auto_mean_vjps'], '.2f'):>10} "
            f"{_s(r['auto_max_k']):>10} {_s(r['ratio'], '.2f'):>6}"
        )
    print(f"({out['seconds']:.0f} s; JSON in {args.out})")


def _s(v: Any, fmt: str = "") -> str:
    return "-" if v is None else format(v, fmt)


def _row(method, lam, kind, k, tol, cos, ks) -> dict[str, Any]:
    return {
        "method": method,
        "lam": lam,
        "kind": kind,
        "k": k,
        "tol": tol,
        "cos_mean": float(cos.mean()),
        "cos_p10": float(np.percentile(cos, 10)),
        "cos_min": float(cos.min()),
        "vjps_mean": float(np.mean(ks)),
        "k_max_chosen": int(np.max(ks)),
    }


if __name__ == "__main__":
    main()
