"""GMRES and BiCGStab, the linear solvers of the IFT backward system (I - Jᵀ) v = g: against
dense solves on small float64 systems, per-sample residuals against the true residual,
breakdowns and non-finite samples, the exact gradient through ``IFT(solver=...)``, and where
they are refused (forward solves, bad options, the forward config section)."""

from __future__ import annotations

import pytest
import torch

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D

DT = torch.float64
KRYLOV = {"gmres": pdq.GMRES, "bicgstab": pdq.BiCGStab}


def _system(batch: int = 3, n: int = 8, radius: float = 0.9, seed: int = 0):
    """Per-sample ``M`` (spectral norm ``radius``), ``op(v) = M v`` and ``rhs``."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, n, n, generator=gen, dtype=DT)
    m = radius * m / torch.linalg.matrix_norm(m, 2)[:, None, None]
    rhs = torch.randn(batch, n, generator=gen, dtype=DT)
    return m, rhs


def _op(m: torch.Tensor):
    calls = []

    def op(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.bmm(m, v.unsqueeze(2)).squeeze(2)

    return op, calls


def _exact(m: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(m.shape[1], dtype=DT).expand_as(m)
    return torch.linalg.solve(eye - m, rhs)


def _true_residual(m: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x - torch.bmm(m, x.unsqueeze(2)).squeeze(2) - rhs, dim=1)


@pytest.mark.parametrize("name", KRYLOV)
def test_solves_the_linear_fixed_point_like_a_dense_solve(name):
    # radius 1.5: not a contraction, the fixed-point iteration diverges; I - M is invertible
    m, rhs = _system(radius=1.5, seed=1)
    assert bool((torch.linalg.eigvals(m).abs().amax(dim=1) < 1.0).logical_not().any())
    op, calls = _op(m)
    sol = KRYLOV[name](max_iter=200, tol=1e-12, stop="abs").solve_linear(op, rhs)
    assert sol.result == "converged" and bool(sol.converged.all())
    torch.testing.assert_close(sol.z, _exact(m, rhs), rtol=0, atol=1e-9)
    assert sol.niter == len(calls)  # niter counts the products op(v)


def test_gmres_with_a_full_restart_is_exact_within_dimension_steps():
    n = 8
    m, rhs = _system(n=n, radius=1.2, seed=2)
    op, calls = _op(m)
    # n Arnoldi steps + 1 product re-measuring the residual
    sol = pdq.GMRES(max_iter=n + 1, tol=1e-11, stop="abs", restart=n).solve_linear(op, rhs)
    assert len(calls) <= n + 1
    torch.testing.assert_close(sol.z, _exact(m, rhs), rtol=0, atol=1e-10)
    assert sol.result == "converged"
    # one step short of the dimension: not exact (the Krylov space misses a direction)
    short = pdq.GMRES(max_iter=n, tol=0.0, restart=n).solve_linear(_op(m)[0], rhs)
    assert float(short.abs_residual.max()) > 1e-6


@pytest.mark.parametrize("name", KRYLOV)
@pytest.mark.parametrize("budget", [1, 2, 5])
def test_reported_residuals_are_the_true_residuals_per_sample(name, budget):
    m, rhs = _system(n=12, radius=0.95, seed=3)
    op, calls = _op(m)
    kwargs = {"restart": 3} if name == "gmres" else {}
    sol = KRYLOV[name](max_iter=budget, tol=0.0, **kwargs).solve_linear(op, rhs)
    assert len(calls) == budget == sol.niter  # a fixed budget uses all of it
    true = _true_residual(m, rhs, sol.z)
    assert sol.abs_residual.shape == (3,)
    torch.testing.assert_close(sol.abs_residual, true, rtol=1e-9, atol=1e-13)
    norm = torch.linalg.vector_norm(sol.z, dim=1)
    torch.testing.assert_close(sol.rel_residual, true / (norm + 1e-12), rtol=1e-9, atol=1e-13)
    assert bool((sol.nstep <= budget).all())
    if budget == 5:  # and the iteration made progress over x = 0 (residual ||rhs||)
        assert bool((true < torch.linalg.vector_norm(rhs, dim=1)).all())


@pytest.mark.parametrize("name", KRYLOV)
def test_a_given_start_and_the_restarts_converge(name):
    m, rhs = _system(n=10, radius=0.9, seed=4)
    x0 = torch.randn(3, 10, dtype=DT, generator=torch.Generator().manual_seed(5))
    kwargs = {"restart": 2} if name == "gmres" else {}
    op, calls = _op(m)
    sol = KRYLOV[name](max_iter=300, tol=1e-10, **kwargs).solve_linear(op, rhs, x0)
    assert sol.result == "converged"
    assert bool((sol.rel_residual <= 1e-10).all())
    torch.testing.assert_close(sol.z, _exact(m, rhs), rtol=0, atol=1e-8)


def test_breakdowns_are_handled_per_sample_without_nan():
    n = 4
    # sample 0: A = I (op = 0): happy breakdown after one GMRES step;
    # sample 1: A = a rotation by 90 degrees in each plane: <r, A r> = 0 for every r, so
    #           BiCGStab's <r̂, A p> vanishes at once;
    # sample 2: rhs = 0: the solution is 0 from the start
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=DT)
    a1 = torch.block_diag(rot, rot)
    m = torch.stack([torch.zeros(n, n, dtype=DT), torch.eye(n, dtype=DT) - a1, 0.5 * a1])
    rhs = torch.randn(3, n, dtype=DT, generator=torch.Generator().manual_seed(6))
    rhs[2] = 0.0
    gm = pdq.GMRES(max_iter=10, tol=1e-12, stop="abs", restart=10).solve_linear(_op(m)[0], rhs)
    assert gm.result == "converged" and bool(torch.isfinite(gm.z).all())
    torch.testing.assert_close(gm.z, _exact(m, rhs), rtol=0, atol=1e-12)
    bi = pdq.BiCGStab(max_iter=12, tol=1e-12, stop="abs").solve_linear(_op(m)[0], rhs)
    assert bool(torch.isfinite(bi.z).all()) and not bool(bi.nonfinite.any())
    assert bool(torch.isfinite(bi.abs_residual).all())
    torch.testing.assert_close(bi.abs_residual, _true_residual(m, rhs, bi.z), rtol=1e-9, atol=0)
    # samples 0 and 2 are solved; sample 1 (the skew system) at most not improved
    assert bool(bi.converged[[0, 2]].all())
    torch.testing.assert_close(bi.z[[0, 2]], _exact(m, rhs)[[0, 2]], rtol=0, atol=1e-12)
    assert float(bi.abs_residual[1]) <= float(torch.linalg.vector_norm(rhs[1])) + 1e-12


@pytest.mark.parametrize("name", KRYLOV)
def test_a_nonfinite_sample_is_marked_and_the_others_solved(name):
    m, rhs = _system(seed=7)
    rhs[1, 2] = float("nan")
    sol = KRYLOV[name](max_iter=100, tol=1e-10).solve_linear(_op(m)[0], rhs)
    assert sol.result == "nonfinite"
    assert sol.nonfinite.tolist() == [False, True, False]
    assert sol.converged.tolist() == [True, False, True]
    torch.testing.assert_close(sol.z[[0, 2]], _exact(m, rhs)[[0, 2]], rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", KRYLOV)
def test_ift_with_a_krylov_backward_is_the_exact_gradient(name, tuple_state):
    cell, x = make_problem(tuple_state)
    est = pdq.IFT(solver=KRYLOV[name](max_iter=60, tol=1e-13))
    deq = pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=300, tol=1e-14), grad=est)
    z, info = deq(cell.z0(3), x)
    t = state_target(z)
    wrt = [*cell.parameters(), x]
    grads = torch.autograd.grad(inner(z, t), wrt)
    exact = D.exact_gradient(cell, info.z, (x,), wrt, t)
    assert D.relative_error(grads, exact) <= 1e-8
    back = info.backward
    assert back is est.last_backward and back.result == "converged"
    if name == "gmres":  # a 6- or 10-dimensional system: within dimension + 1 products
        assert back.niter <= 11


def test_ift_second_order_with_gmres_matches_the_fixed_point_backward():
    cell, x = make_problem(False)
    t = state_target(torch.zeros(3, 6, dtype=DT))

    def grad_norm(solver) -> torch.Tensor:
        deq = pdq.DEQ(
            cell, solver=pdq.FixedPoint(max_iter=300, tol=1e-14), grad=pdq.IFT(solver=solver)
        )
        z, _ = deq(cell.z0(3), x)
        (gx,) = torch.autograd.grad(inner(z, t), [x], create_graph=True)
        (hx,) = torch.autograd.grad(gx.square().sum(), [x])
        return hx

    reference = grad_norm(pdq.FixedPoint(max_iter=400, tol=1e-14))
    torch.testing.assert_close(
        grad_norm(pdq.GMRES(max_iter=40, tol=1e-13)), reference, rtol=1e-8, atol=1e-12
    )


@pytest.mark.parametrize(
    ("build", "error", "pattern"),
    [
        (lambda: pdq.GMRES(restart=0), ValueError, r"GMRES: restart must be an integer >= 1"),
        (lambda: pdq.GMRES(max_iter=0), ValueError, r"GMRES: max_iter must be an integer >= 1"),
        (lambda: pdq.BiCGStab(max_iter=0), ValueError, r"BiCGStab: max_iter must be"),
        (lambda: pdq.GMRES(tol=-1e-3), ValueError, r"GMRES: tol must be in \[0.0, inf\)"),
        (lambda: pdq.BiCGStab(tol=-1.0), ValueError, r"BiCGStab: tol must be in"),
        (lambda: pdq.GMRES(restart=2.5), TypeError, r"GMRES: restart must be an integer"),
        (lambda: pdq.BiCGStab(stop="max"), ValueError, r"BiCGStab: stop must be one of"),
        (lambda: pdq.solvers.from_name("gmres", memory=3), ValueError, r"allowed: max_iter"),
    ],
)
def test_bad_options_name_the_field(build, error, pattern):
    with pytest.raises(error, match=pattern):
        build()


def test_krylov_solvers_are_refused_as_forward_solvers():
    cell, _ = make_problem(False)
    for solver in (pdq.GMRES(), pdq.BiCGStab()):
        with pytest.raises(TypeError, match=r"DEQ: solver .* is a linear solver"):
            pdq.DEQ(cell, solver=solver, grad=pdq.IFT())
        with pytest.raises(TypeError, match=r"DEQ: eval_solver .* is a linear solver"):
            pdq.DEQ(cell, solver=pdq.Anderson(), eval_solver=solver, grad=pdq.IFT())
    with pytest.raises(TypeError, match=r"rhs must be a floating \(B, D\) tensor"):
        pdq.GMRES().solve_linear(lambda v: v, torch.zeros(2, 3, 4, dtype=DT))


def test_config_reaches_the_krylov_backward_solvers_only_for_ift():
    from phantomdeq.train.build import build_grad
    from phantomdeq.train.config import ConfigError, config_from_dict

    cfg = config_from_dict(
        {"grad": {"name": "ift", "backward_solver": {"name": "gmres", "restart": 7}}}
    )
    ift = build_grad(cfg.grad)
    assert isinstance(ift.solver, pdq.GMRES) and ift.solver.restart == 7
    assert ift.solver.max_iter == 30 and ift.solver.tol == 1e-6  # the section's defaults
    cfg = config_from_dict({"grad": {"name": "ift", "backward_solver": {"name": "bicgstab"}}})
    assert isinstance(build_grad(cfg.grad).solver, pdq.BiCGStab)
    with pytest.raises(ConfigError, match=r"grad\.backward_solver\.restart: GMRES: restart"):
        config_from_dict({"grad": {"backward_solver": {"name": "gmres", "restart": 0}}})
    with pytest.raises(ConfigError, match=r"solver\.name"):
        config_from_dict({"solver": {"name": "gmres"}})
