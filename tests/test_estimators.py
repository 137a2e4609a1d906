"""Every gradient estimator against the mathematics it claims (float64, dense Jacobians)."""

from __future__ import annotations

import pytest
import torch

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D

FORWARD = {
    "fixed_point": lambda: pdq.FixedPoint(max_iter=300, tol=1e-13),
    "anderson": lambda: pdq.Anderson(max_iter=300, tol=1e-13),
    "broyden": lambda: pdq.Broyden(max_iter=300, tol=1e-13),
}
BACKWARD = {
    "fixed_point": lambda: pdq.FixedPoint(max_iter=400, tol=1e-13),
    "anderson": lambda: pdq.Anderson(max_iter=200, tol=1e-13),
    "broyden": lambda: pdq.Broyden(max_iter=200, tol=1e-13),
}


def _grads(cell, x, estimator, solver, tuple_state):
    deq = pdq.DEQ(cell, solver=solver, grad=estimator)
    z, info = deq(cell.z0(x.shape[0]), x)
    assert info.result == "converged"
    assert isinstance(z, tuple) == tuple_state  # the fixture really builds a tuple problem
    t = state_target(z)
    wrt = [*cell.parameters(), x]
    grads = torch.autograd.grad(inner(z, t), wrt)
    return list(grads), info, t, wrt


@pytest.mark.parametrize("fwd", FORWARD)
@pytest.mark.parametrize("bwd", BACKWARD)
def test_ift_equals_dense_exact_gradient(fwd, bwd, tuple_state):
    cell, x = make_problem(tuple_state)
    est = pdq.IFT(solver=BACKWARD[bwd]())
    grads, info, t, wrt = _grads(cell, x, est, FORWARD[fwd](), tuple_state)
    exact = D.exact_gradient(cell, info.z, (x,), wrt, t)
    # parameters and the input separately; float64 with tol=1e-13 solves: the errors are
    # rounding-level (~1e-13), so 1e-10 fails on any mathematical slip
    err_p = D.relative_error(grads[:-1], exact[:-1])
    err_x = D.relative_error(grads[-1], exact[-1])
    assert err_p <= 1e-10
    assert err_x <= 1e-10
    assert est.last_backward is not None and est.last_backward.result == "converged"
    assert info.backward is est.last_backward


def test_ift_matches_finite_differences(tuple_state):
    """Exact gradient of L(z*(θ)) checked against central differences of the solved model."""
    cell, x = make_problem(tuple_state)
    solver = pdq.FixedPoint(max_iter=500, tol=1e-14)
    grads, info, t, wrt = _grads(
        cell, x, pdq.IFT(solver=pdq.FixedPoint(max_iter=500, tol=1e-14)), solver, tuple_state
    )

    def loss() -> float:
        with torch.no_grad():
            sol = solver(lambda z: cell(z, x), cell.z0(x.shape[0]))
            return float(inner(sol.z, t))

    eps = 1e-6
    gen = torch.Generator().manual_seed(3)
    for p, g in zip(wrt, grads):
        for _ in range(3):
            idx = int(torch.randint(p.numel(), (1,), generator=gen))
            flat = p.data.view(-1)
            old = float(flat[idx])
            flat[idx] = old + eps
            up = loss()
            flat[idx] = old - eps
            down = loss()
            flat[idx] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - float(g.reshape(-1)[idx])) <= 1e-7 + 1e-6 * abs(fd)


@pytest.mark.parametrize("fwd", FORWARD)
@pytest.mark.parametrize("k,lam", [(1, 1.0), (3, 0.5), (6, 0.8), (10, 0.3)])
def test_npg_equals_explicit_neumann_matrix(fwd, k, lam, tuple_state):
    cell, x = make_problem(tuple_state)
    grads, info, t, wrt = _grads(cell, x, pdq.NPG(k=k, lam=lam), FORWARD[fwd](), tuple_state)
    J_h, J_w = D.dense_jacobians(cell, info.z, (x,), wrt)
    A = D.neumann_matrix(D.paper_layout(J_h), D.paper_layout(J_w), k, lam)
    g = torch.cat([p.reshape(-1) for p in (t if isinstance(t, tuple) else (t,))])
    assert D.relative_error(grads, A @ g) <= 1e-8


@pytest.mark.parametrize("fwd", ["fixed_point", "broyden"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("k,lam", [(1, 1.0), (4, 0.5), (7, 0.9)])
def test_upg_equals_explicit_unrolled_product(fwd, checkpoint, k, lam, tuple_state):
    cell, x = make_problem(tuple_state)
    # a loose forward solve: eq. (17) uses Jacobians along the trajectory, which then differ from h*
    solver = pdq.FixedPoint(max_iter=4, tol=1e-13) if fwd == "fixed_point" else FORWARD[fwd]()
    deq = pdq.DEQ(cell, solver=solver, grad=pdq.UPG(k=k, lam=lam, checkpoint=checkpoint))
    z, info = deq(cell.z0(x.shape[0]), x)
    t = state_target(z)
    wrt = [*cell.parameters(), x]
    grads = torch.autograd.grad(inner(z, t), wrt)
    A = D.unrolled_matrix(cell, info.z, (x,), wrt, k, lam)
    g = torch.cat([p.reshape(-1) for p in (t if isinstance(t, tuple) else (t,))])
    assert D.relative_error(grads, A @ g) <= 1e-8


def test_onestep_is_jtheta_transpose_g_and_equals_upg_1_1(tuple_state):
    cell, x = make_problem(tuple_state)
    solver = pdq.FixedPoint(max_iter=300, tol=1e-13)
    g1, info, t, wrt = _grads(cell, x, pdq.OneStep(), solver, tuple_state)
    g2, *_ = _grads(cell, x, pdq.UPG(k=1, lam=1.0), solver, tuple_state)
    _, J_w = D.dense_jacobians(cell, info.z, (x,), wrt)
    g = torch.cat([p.reshape(-1) for p in (t if isinstance(t, tuple) else (t,))])
    assert D.relative_error(g1, J_w.T @ g) <= 1e-10
    assert D.relative_error(g2, g1) <= 1e-12


@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_bptt_equals_autograd_through_the_same_iterations(damping, tuple_state):
    cell, x = make_problem(tuple_state)
    solver = pdq.FixedPoint(max_iter=12, tol=1e-30, damping=damping)
    g_bptt, info, t, wrt = _grads_no_conv(cell, x, pdq.BPTT(), solver)
    assert info.niter == 12
    # reference: a hand-written unroll of the same 11 updates after the first evaluation
    z = cell.z0(x.shape[0])
    for _ in range(info.niter - 1):
        fz = cell(z, x)
        if isinstance(z, tuple):
            z = tuple(damping * a + (1 - damping) * b for a, b in zip(fz, z))
        else:
            z = damping * fz + (1 - damping) * z
    ref = torch.autograd.grad(inner(z, t), wrt)
    assert D.relative_error(g_bptt, ref) <= 1e-12


def _grads_no_conv(cell, x, estimator, solver):
    deq = pdq.DEQ(cell, solver=solver, grad=estimator)
    z, info = deq(cell.z0(x.shape[0]), x)
    t = state_target(z)
    wrt = [*cell.parameters(), x]
    return list(torch.autograd.grad(inner(z, t), wrt)), info, t, wrt


@pytest.mark.parametrize("name", ["upg", "npg"])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_phantom_gradients_converge_to_ift_as_k_grows(name, lam, tuple_state):
    cell, x = make_problem(tuple_state)
    solver = pdq.FixedPoint(max_iter=300, tol=1e-13)
    exact, *_ = _grads(
        cell, x, pdq.IFT(solver=pdq.FixedPoint(max_iter=300, tol=1e-13)), solver, tuple_state
    )
    errors = []
    for k in (1, 5, 30):
        est = pdq.grad.from_name(name, k=k, lam=lam)
        g, *_ = _grads(cell, x, est, solver, tuple_state)
        errors.append(D.relative_error(g, exact))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-3


def test_upg_and_npg_coincide_for_linear_f_at_exact_fixed_point():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 5, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))

    def f(z, x):
        return lin(z) + x

    cell = torch.nn.Module()
    cell.lin = lin
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    out = []
    for est in (pdq.UPG(k=6, lam=0.7), pdq.NPG(k=6, lam=0.7)):
        deq = pdq.DEQ(_Wrap(f, lin), solver=pdq.Broyden(max_iter=60, tol=1e-14), grad=est)
        z, _ = deq(torch.zeros(2, 5, dtype=torch.float64), x)
        t = state_target(z)
        out.append(torch.autograd.grad(inner(z, t), [*lin.parameters(), x]))
    assert D.relative_error(out[0], out[1]) <= 1e-10


class _Wrap(torch.nn.Module):
    def __init__(self, fn, mod):
        super().__init__()
        self.fn = fn
        self.mod = mod

    def forward(self, z, x):
        return self.fn(z, x)
