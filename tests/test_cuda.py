"""CUDA checks (skipped without a GPU): same numbers as on CPU, few host synchronisations."""

from __future__ import annotations

import warnings

import pytest
import torch

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("est", ["ift", "upg", "npg"])
def test_cuda_matches_cpu(solver, est, tuple_state):
    grads = []
    for dev in ("cpu", "cuda"):
        cell, x = make_problem(tuple_state)
        cell = cell.to(dev)
        x = x.detach().to(dev).requires_grad_()
        deq = pdq.DEQ(
            cell,
            solver=pdq.solvers.from_name(solver, max_iter=100, tol=1e-11),
            # a tight backward tolerance: on CUDA convergence is checked every 4 iterations, so a
            # loose IFT solve would stop at a different iteration than on CPU
            grad=pdq.IFT(pdq.FixedPoint(max_iter=300, tol=1e-13))
            if est == "ift"
            else pdq.grad.from_name(est, k=5, lam=0.5),
        )
        z0 = cell.z0(3)
        z0 = tuple(t.to(dev) for t in z0) if isinstance(z0, tuple) else z0.to(dev)
        z, info = deq(z0, x)
        assert info.result == "converged"
        t = state_target(tuple(p.cpu() for p in z) if isinstance(z, tuple) else z.cpu())
        t = tuple(p.to(dev) for p in t) if isinstance(t, tuple) else t.to(dev)
        g = torch.autograd.grad(inner(z, t), [*cell.parameters(), x])
        grads.append([a.cpu() for a in g])
    assert D.relative_error(grads[1], grads[0]) < 1e-9


@pytest.mark.parametrize("name", ["fixed_point", "anderson", "broyden"])
def test_host_syncs_are_rare(name):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).cuda()
    x = torch.randn(4, 8, 16, 16, device="cuda")

    def g(z):
        return torch.tanh(0.3 * conv(z) + x)

    solver = pdq.solvers.from_name(name, max_iter=40, tol=0.0)
    solver(g, torch.zeros_like(x))  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sol = solver(g, torch.zeros_like(x))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert sol.niter == 40
    # one check every 4 iterations plus the final conversion of the trace
    assert len(syncs) <= 40 // 4 + 4, [str(w.message)[:120] for w in syncs[:5]]
