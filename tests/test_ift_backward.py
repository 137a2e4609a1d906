"""The IFT backward solve: any solver with the protocol ``solver(g, z0) -> Solution``, its
statistics on the forward ``info``, the warning when it stops short, and a backward map that
never writes into the solver's iterate."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D

DT = torch.float64


def _forward_tight() -> pdq.FixedPoint:
    return pdq.FixedPoint(max_iter=300, tol=1e-14)


# --------------------------------------------------------------------------- solver protocol


class _OwnSolver:
    """A user's solver, not a phantomdeq.Solver subclass: plain Picard iteration."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, g, z0):
        self.shapes.append(tuple(z0.shape))
        return pdq.FixedPoint(max_iter=400, tol=1e-14)(g, z0)


def _function_solver(g, z0):
    return pdq.Anderson(max_iter=200, tol=1e-14)(g, z0)


@pytest.mark.parametrize("kind", ["object", "function"])
def test_ift_accepts_any_solver_with_the_protocol(kind, tuple_state):
    cell, x = make_problem(tuple_state)
    own = _OwnSolver()
    est = pdq.IFT(solver=own if kind == "object" else _function_solver)
    deq = pdq.DEQ(cell, solver=_forward_tight(), grad=est)
    z, info = deq(cell.z0(3), x)
    assert isinstance(z, tuple) == tuple_state
    t = state_target(z)
    wrt = [*cell.parameters(), x]
    grads = torch.autograd.grad(inner(z, t), wrt)
    exact = D.exact_gradient(cell, info.z, (x,), wrt, t)
    assert D.relative_error(grads, exact) <= 1e-10
    if kind == "object":
        assert own.shapes == [(3, 10 if tuple_state else 6)]  # the flat (B, D) state


def test_ift_rejects_a_solver_that_returns_something_else():
    cell, x = make_problem(False)
    deq = pdq.DEQ(cell, solver=_forward_tight(), grad=pdq.IFT(solver=lambda g, z0: "done"))
    z, _ = deq(cell.z0(3), x)
    with pytest.raises(TypeError, match="must return a Solution whose z is a tensor"):
        z.sum().backward()


# --------------------------------------------------------------------------- info.backward


def test_backward_solution_is_published_on_info(tuple_state):
    cell, x = make_problem(tuple_state)
    est = pdq.IFT(solver=pdq.FixedPoint(max_iter=400, tol=1e-12))
    deq = pdq.DEQ(cell, solver=_forward_tight(), grad=est)
    z, info = deq(cell.z0(3), x)
    assert info.backward is None  # no backward pass yet
    inner(z, state_target(z)).backward()
    back = info.backward
    assert back is est.last_backward
    assert back.result == "converged" and bool(back.converged.all())
    assert back.residual.shape == (3,) and float(back.residual.max()) <= 1e-12
    assert 0 < back.niter < 400
    # each forward pass gets its own record
    z2, info2 = deq(cell.z0(3), x)
    assert info2.backward is None and info.backward is back


def _unconverged(deq, cell, x):
    z, info = deq(cell.z0(3), x)
    inner(z, state_target(z)).backward()
    return info


def test_unconverged_backward_warns_once_per_call_site():
    cell, x = make_problem(False)
    deq = pdq.DEQ(
        cell, solver=_forward_tight(), grad=pdq.IFT(solver=pdq.FixedPoint(max_iter=2, tol=1e-12))
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: once per location
        for _ in range(3):
            z, info = deq(cell.z0(3), x)
            inner(z, state_target(z)).backward()  # call site 1
        info2 = _unconverged(deq, cell, x)  # call site 2 (inside the helper)
    msgs = [w for w in caught if "IFT backward solve did not reach" in str(w.message)]
    assert len(msgs) == 2
    assert all(w.category is RuntimeWarning and w.filename == __file__ for w in msgs)
    assert info.backward.result == "max_iter" and info.backward.niter == 2
    assert not bool(info2.backward.converged.all())


def test_unconverged_backward_warning_can_be_switched_off():
    cell, x = make_problem(False)
    est = pdq.IFT(solver=pdq.FixedPoint(max_iter=2, tol=1e-12), warn_unconverged=False)
    deq = pdq.DEQ(cell, solver=_forward_tight(), grad=est)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = _unconverged(deq, cell, x)
    assert info.backward.result == "max_iter"
    assert repr(est).endswith("warn_unconverged=False)")


# --------------------------------------------------------------------------- in-place hazard


class _PassThrough(nn.Module):
    """f(z, x) = z + c(x), optionally through views of z: ∂f/∂z = I, and autograd returns the
    cotangent itself (a view of the solver's iterate) as the vector-Jacobian product."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.view = view
        self.U = nn.Parameter(torch.linspace(-1.0, 1.0, 18, dtype=DT).reshape(6, 3))

    def forward(self, z, x):
        if self.view:
            z = z.view(z.shape[0], 2, 3).reshape(z.shape[0], 6)
        return z + 0.1 * torch.tanh(x @ self.U.T)


class _OneStepProbe(pdq.FixedPoint):
    """Evaluates the backward map once at its start and records whether that modified it."""

    mutated: bool | None = None

    def _solve(self, gf, x0, tracker):
        before = x0.clone()
        fx = gf(x0)
        type(self).mutated = not torch.equal(x0, before)
        tracker.update(x0, fx)


@pytest.mark.parametrize("view", [False, True], ids=["pass_through", "view"])
def test_backward_map_does_not_write_into_the_solvers_iterate(view):
    cell = _PassThrough(view)
    x = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    probe = _OneStepProbe(max_iter=2, tol=0.0)  # its _solve stops after one map
    deq = pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=3, tol=0.0), grad=pdq.IFT(solver=probe))
    z, info = deq(torch.zeros(3, 6, dtype=DT), x)
    g = state_target(z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-step backward solve does not converge
        (grad_u,) = torch.autograd.grad(inner(z, g), [cell.U])
    assert probe.mutated is False
    # the one recorded iterate is the start v = g, so the gradient is J_Uᵀ g
    _, J_u = D.dense_jacobians(cell, info.z, (x,), [cell.U])
    assert D.relative_error(grad_u.reshape(-1), J_u.T @ g.reshape(-1)) <= 1e-12
