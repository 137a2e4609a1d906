"""Forward solvers: convergence, outcomes, per-sample bookkeeping and robustness."""

from __future__ import annotations

import math

import pytest
import torch

import phantomdeq as pdq
from phantomdeq.solvers import from_name

ALL = {
    "fixed_point": lambda **kw: pdq.FixedPoint(**kw),
    "anderson": lambda **kw: pdq.Anderson(**kw),
    "broyden": lambda **kw: pdq.Broyden(**kw),
}


def contractive_problem(batch=4, d=40, rho=0.9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(batch, d, d, dtype=torch.float64, generator=gen)
    W = rho * W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    c = torch.randn(batch, d, dtype=torch.float64, generator=gen)

    def g(z):
        return torch.tanh(torch.bmm(W, z.unsqueeze(-1)).squeeze(-1) + c)

    return g, torch.zeros(batch, d, dtype=torch.float64)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("stop", ["abs", "rel"])
def test_reaches_tol_on_contractive_problem(name, stop):
    g, z0 = contractive_problem()
    sol = ALL[name](max_iter=200, tol=1e-9, stop=stop)(g, z0)
    assert sol.result == "converged"
    assert bool(sol.converged.all())
    true_abs = torch.linalg.vector_norm(g(sol.z) - sol.z, dim=1)
    assert torch.allclose(sol.abs_residual, true_abs, rtol=1e-6, atol=1e-15)
    assert torch.allclose(sol.rel_residual, true_abs / sol.z.norm(dim=1), rtol=1e-6)
    res = sol.abs_residual if stop == "abs" else sol.rel_residual
    assert float(res.max()) <= 1e-9
    assert torch.equal(sol.residual, res)
    assert sol.niter == len(sol.trace) <= 200
    assert int(sol.nstep.max()) <= sol.niter


@pytest.mark.parametrize("name", ALL)
def test_tuple_state_matches_tensor_state(name):
    """The same problem posed on a tuple of views must give the same solution."""
    g, z0 = contractive_problem(batch=2, d=12)

    def gt(z):
        a, b = z
        out = g(torch.cat([a.reshape(2, -1), b], dim=1))
        return (out[:, :8].reshape(2, 2, 4), out[:, 8:])

    s1 = ALL[name](max_iter=100, tol=1e-10)(g, z0)
    s2 = ALL[name](max_iter=100, tol=1e-10)(gt, (z0[:, :8].reshape(2, 2, 4), z0[:, 8:]))
    assert isinstance(s2.z, tuple) and s2.z[0].shape == (2, 2, 4) and s2.z[1].shape == (2, 4)
    joined = torch.cat([s2.z[0].reshape(2, -1), s2.z[1]], dim=1)
    assert torch.allclose(joined, s1.z, atol=1e-12)
    assert s1.niter == s2.niter


@pytest.mark.parametrize("name", ALL)
def test_reports_max_iter_on_a_problem_it_cannot_solve(name):
    g, z0 = contractive_problem(rho=0.999, d=60)
    sol = ALL[name](max_iter=3, tol=1e-12)(g, z0)
    assert sol.result == "max_iter"
    assert sol.niter == 3
    assert not bool(sol.converged.any())


@pytest.mark.parametrize("name", ALL)
def test_returns_per_sample_best_iterate(name):
    """Sample 0 converges; sample 1 is an expanding oscillation: its best iterate is its first."""
    scale = torch.tensor([0.5, -1.7], dtype=torch.float64)[:, None]

    def g(z):
        return scale * z + 1.0

    z0 = torch.full((2, 3), 0.1, dtype=torch.float64)
    sol = ALL[name](max_iter=40, tol=1e-9, stop="abs")(g, z0)
    true = torch.linalg.vector_norm(g(sol.z) - sol.z, dim=1)
    assert torch.allclose(true, sol.abs_residual)
    if name == "fixed_point":
        # sample 1 diverges under plain iteration: the first iterate is the best
        assert torch.equal(sol.z[1], z0[1])
        assert int(sol.nstep[1]) == 1
    # whatever the path, the returned iterate has the lowest residual seen for each sample
    assert float(sol.residual[0]) <= 1e-9
    assert sol.converged.tolist()[0] is True
    assert min(sol.trace) >= float(sol.residual.max()) - 1e-12


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_values_stop_the_solver(name):
    def g(z):
        return z * float("inf")

    sol = ALL[name](max_iter=20, tol=1e-6)(g, torch.ones(2, 3))
    assert sol.result == "nonfinite"
    assert sol.niter <= 2


def test_anderson_survives_a_singular_least_squares_system():
    """g constant: every residual after the first step is zero, the Gram matrix is singular."""
    c = torch.randn(3, 5)

    def g(z):
        return c.clone()

    sol = pdq.Anderson(max_iter=10, tol=0.0, lam=0.0, m=4)(g, torch.zeros(3, 5))
    assert torch.isfinite(sol.residual).all()
    assert torch.allclose(sol.z, c)
    # and a rank-deficient history (duplicate directions) on a linear map
    A = torch.zeros(5, 5)
    A[0, 0] = 0.9

    def g2(z):
        return z @ A.T + 1.0

    sol2 = pdq.Anderson(max_iter=30, tol=1e-7, lam=0.0)(g2, torch.zeros(2, 5))
    assert sol2.result == "converged"


def test_anderson_and_broyden_beat_fixed_point_on_a_slow_linear_problem():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64, generator=gen))
    A = Q @ torch.diag(torch.linspace(0, 0.99, 50, dtype=torch.float64)) @ Q.T
    c = torch.randn(2, 50, dtype=torch.float64, generator=gen)

    def g(z):
        return z @ A.T + c

    z0 = torch.zeros(2, 50, dtype=torch.float64)
    fp = pdq.FixedPoint(max_iter=100, tol=1e-8)(g, z0)
    aa = pdq.Anderson(max_iter=100, tol=1e-8)(g, z0)
    br = pdq.Broyden(max_iter=100, tol=1e-8)(g, z0)
    assert fp.result == "max_iter"
    assert float(aa.residual.max()) < 1e-3 * float(fp.residual.max())
    assert br.result == "converged"


def test_broyden_memory_limit_still_converges():
    g, z0 = contractive_problem(rho=0.95)
    sol = pdq.Broyden(max_iter=200, tol=1e-9, memory=4)(g, z0)
    assert sol.result == "converged"


def test_solver_does_not_record_a_graph_and_does_not_touch_z0():
    w = torch.nn.Parameter(torch.tensor(0.5))
    z0 = torch.ones(2, 3)
    keep = z0.clone()
    sol = pdq.Anderson(max_iter=30, tol=1e-8)(lambda z: w * z + 1, z0)
    assert not sol.z.requires_grad
    assert torch.equal(z0, keep)
    assert torch.allclose(sol.z, torch.full((2, 3), 2.0), atol=1e-6)


@pytest.mark.parametrize(
    "factory,message",
    [
        (lambda: pdq.FixedPoint(max_iter=0), "max_iter"),
        (lambda: pdq.FixedPoint(tol=-1.0), "tol"),
        (lambda: pdq.FixedPoint(stop="max"), "stop"),
        (lambda: pdq.FixedPoint(damping=0.0), "damping"),
        (lambda: pdq.FixedPoint(damping=1.5), "damping"),
        (lambda: pdq.Anderson(m=0), "m"),
        (lambda: pdq.Anderson(beta=0.0), "beta"),
        (lambda: pdq.Anderson(lam=-1.0), "lam"),
        (lambda: pdq.Broyden(memory=0), "memory"),
        (lambda: pdq.Anderson(tol=math.nan), "tol"),
        (
            lambda: from_name("newton"),
            "unknown solver 'newton'; allowed: fixed_point, anderson, broyden",
        ),
        (lambda: from_name("anderson", window=3), "unknown option(s) ['window']"),
    ],
)
def test_bad_solver_options_name_the_field(factory, message):
    with pytest.raises(ValueError) as err:
        factory()
    assert message in str(err.value)


def test_from_name_builds_each_solver():
    assert isinstance(from_name("fixed_point", damping=0.5), pdq.FixedPoint)
    assert isinstance(from_name("Anderson", m=3), pdq.Anderson)
    assert isinstance(from_name("broyden", memory=4), pdq.Broyden)
