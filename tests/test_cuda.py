"""CUDA checks (skipped without a GPU): same numbers as on CPU, few host synchronisations.

The CPU-vs-CUDA bound of ``test_cuda_matches_cpu`` is 1e-9 relative on float64 problems. TF32
does not apply (it only changes float32 matmuls and convolutions) and cuBLAS/cuDNN float64
results differ from the CPU's by summation order only (~1e-16 relative). What does differ is
*when a solver stops*: on CUDA the convergence test runs every 4 iterations (``check_every``,
fewer host syncs), on CPU every iteration. With IFT's default backward solver (fixed point,
tol 1e-6) the CUDA backward solve ran up to 3 more iterations and the gradients differed by
2.34e-7 (tensor state) / 3.33e-7 (tuple state) -- the 6 failures of the 2026-11-27 H100 run,
reproduced on CPU by ``test_stop_check_interval_explains_cuda_gap``. Solved to 1e-13 the
stopping point no longer matters (~1e-12), so the test keeps its 1e-9 bound with a tight
backward solve rather than loosening the bound to the size of a solver tolerance.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ift_grads(tuple_state: bool, solver: str, check_every: int, backward: pdq.Solver | None):
    cell, x = make_problem(tuple_state)
    x = x.detach().requires_grad_()
    deq = pdq.DEQ(
        cell,
        solver=pdq.solvers.from_name(solver, max_iter=100, tol=1e-11, check_every=check_every),
        grad=pdq.IFT(solver=backward),
    )
    z, info = deq(cell.z0(3), x)
    assert info.result == "converged"
    return torch.autograd.grad(inner(z, state_target(z)), [*cell.parameters(), x])


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_stop_check_interval_explains_cuda_gap(solver, tuple_state):
    """On CPU, checking convergence every 4 iterations (CUDA's default) instead of every
    iteration moves IFT's default backward solve (tol 1e-6) by more than the 1e-9 bound --
    the size of the old CUDA failures -- while a backward solve to 1e-13 agrees to 1e-11."""

    def loose(every: int) -> pdq.Solver:
        return pdq.FixedPoint(max_iter=30, tol=1e-6, check_every=every)

    default = pdq.IFT().solver
    assert (default.tol, default.max_iter) == (1e-6, 30)  # what the old test used
    gap = D.relative_error(
        _ift_grads(tuple_state, solver, 4, loose(4)), _ift_grads(tuple_state, solver, 1, loose(1))
    )
    assert 1e-7 < gap < 1e-6

    def tight(every: int) -> pdq.Solver:
        return pdq.FixedPoint(max_iter=300, tol=1e-13, check_every=every)

    gap = D.relative_error(
        _ift_grads(tuple_state, solver, 4, tight(4)), _ift_grads(tuple_state, solver, 1, tight(1))
    )
    assert gap < 1e-11


@needs_cuda
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
            grad=pdq.IFT(solver=pdq.FixedPoint(max_iter=300, tol=1e-13))
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


@needs_cuda
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


@needs_cuda
@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_cuda_graph_replay_matches_eager(solver, tuple_state):
    """DEQ(cuda_graph=True): the fixed-budget forward solve captured once and replayed on new
    inputs gives the eager solve's solution, statistics and gradients (float64: the same
    kernels, up to cuBLAS summation order)."""
    cell, x = make_problem(tuple_state)
    cell = cell.cuda()
    opts = {"max_iter": 12, "tol": 0.0}
    eager = pdq.DEQ(cell, solver=pdq.solvers.from_name(solver, **opts), grad=pdq.UPG(k=3))
    graphed = pdq.DEQ(
        cell, solver=pdq.solvers.from_name(solver, **opts), grad=pdq.UPG(k=3), cuda_graph=True
    )
    z0 = cell.z0(3)
    z0 = tuple(t.cuda() for t in z0) if isinstance(z0, tuple) else z0.cuda()
    for step in range(3):
        xs = (x.detach() + 0.5 * step).cuda().requires_grad_()
        out = []
        for deq in (eager, graphed):
            z, info = deq(z0, xs)
            t = state_target(tuple(p.cpu() for p in z) if isinstance(z, tuple) else z.cpu())
            t = tuple(p.cuda() for p in t) if isinstance(t, tuple) else t.cuda()
            g = torch.autograd.grad(inner(z, t), [*cell.parameters(), xs])
            out.append((z, info, g))
        (z_e, i_e, g_e), (z_g, i_g, g_g) = out
        zs_e = list(z_e) if isinstance(z_e, tuple) else [z_e]
        zs_g = list(z_g) if isinstance(z_g, tuple) else [z_g]
        assert D.relative_error(zs_g, zs_e) < 1e-12
        assert D.relative_error(g_g, g_e) < 1e-12
        assert i_g.niter == i_e.niter == 12 and torch.equal(i_g.nstep, i_e.nstep)
        assert i_g.trace == pytest.approx(i_e.trace, rel=1e-10)
    assert len(graphed._graphs) == 1


@needs_cuda
def test_cuda_graph_conv_cell_float32_matches_eager():
    """A float32 convolutional cell (cuDNN inside the graph), Anderson with its small solve:
    replay equals eager to float32 rounding."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).cuda()
    x = torch.randn(4, 8, 16, 16, device="cuda")

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, z, x):
            return torch.tanh(0.3 * self.conv(z) + x)

    cell = Cell()
    eager = pdq.DEQ(cell, solver=pdq.Anderson(max_iter=20, tol=0.0), grad=pdq.UPG())
    graphed = pdq.DEQ(
        cell, solver=pdq.Anderson(max_iter=20, tol=0.0), grad=pdq.UPG(), cuda_graph=True
    )
    with torch.no_grad():
        for step in range(2):
            xs = x + 0.1 * step
            z_e, _ = eager(torch.zeros_like(x), xs)
            z_g, _ = graphed(torch.zeros_like(x), xs)
            assert D.relative_error([z_g], [z_e]) < 1e-5
