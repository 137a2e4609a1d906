"""Diagnostics against independent linear algebra."""

from __future__ import annotations

import pytest
import torch

import phantomdeq as pdq
from core_problems import make_problem
from phantomdeq import diagnostics as D


def _part_major(z):
    """Flatten a state the way ``dense_jacobians`` orders it: part by part, each batch-major."""
    parts = z if isinstance(z, tuple) else (z,)
    return torch.cat([p.reshape(-1) for p in parts])


def _from_part_major(vec, like):
    if not isinstance(like, tuple):
        return vec.view_as(like)
    out, start = [], 0
    for p in like:
        out.append(vec[start : start + p.numel()].view_as(p))
        start += p.numel()
    return tuple(out)


def test_dense_jacobians_match_torch_autograd_functional(tuple_state):
    cell, x = make_problem(tuple_state)
    gen = torch.Generator().manual_seed(3)
    z = tuple(
        torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in pdq._state.as_tuple(cell.z0(3))
    )
    z = z if tuple_state else z[0]
    J_h, J_x = D.dense_jacobians(cell, z, (x,), [x])
    n = _part_major(z).numel()
    assert J_h.shape == (n, n) and J_x.shape == (n, 9)
    ref_h = torch.autograd.functional.jacobian(
        lambda v: _part_major(cell(_from_part_major(v, z), x)), _part_major(z)
    )
    ref_x = torch.autograd.functional.jacobian(lambda xx: _part_major(cell(z, xx)), x.detach())
    assert torch.allclose(J_h, ref_h, rtol=0, atol=1e-14)
    assert torch.allclose(J_x, ref_x.reshape(n, 9), rtol=0, atol=1e-14)
    if tuple_state:  # the two parts are coupled both ways: off-diagonal blocks are not zero
        assert float(J_h[:18, 18:].abs().max()) > 1e-3 and float(J_h[18:, :18].abs().max()) > 1e-3


def test_exact_gradient_matches_bptt_through_many_iterations():
    cell, x = make_problem(False)
    z = torch.zeros(3, 6, dtype=torch.float64)
    params = list(cell.parameters())
    for _ in range(200):
        z = cell(z, x)
    t = torch.randn(3, 6, dtype=torch.float64)
    ref = torch.autograd.grad((z * t).sum(), params)
    exact = D.exact_gradient(cell, z.detach(), (x,), params, t)
    assert D.relative_error(exact, ref) < 1e-10


def test_descent_condition_and_remark1():
    cell, x = make_problem(False)
    sol = pdq.FixedPoint(max_iter=300, tol=1e-13)(
        lambda z: cell(z, x), torch.zeros(3, 6, dtype=torch.float64)
    )
    params = [cell.W]
    J_h, J_w = D.dense_jacobians(cell, sol.z, (x,), params)
    dFdh, dFdth = D.paper_layout(J_h), D.paper_layout(J_w)
    eye = torch.eye(18, dtype=torch.float64)
    exact_A = dFdth @ torch.linalg.inv(eye - dFdh)
    res = D.descent_condition(exact_A, dFdh, dFdth)
    assert res["lhs"] < 1e-10 and res["holds"]
    s = torch.linalg.svdvals(dFdth)
    assert abs(res["kappa"] - float(s.max() / s.min())) < 1e-8 * res["kappa"]
    # a terrible A (negative of the exact) violates (6) and is an ascent direction
    bad = D.descent_condition(-exact_A, dFdh, dFdth)
    assert not bad["holds"]
    r1 = D.remark1_condition(torch.linalg.inv(eye - dFdh), dFdh, dFdth)
    assert r1["holds"] and r1["lhs"] < 1e-10
    # Theorem 1 promise: whenever (6) holds, <A g, exact g> >= 0 (checked on NPG over k, λ)
    g = torch.randn(18, dtype=torch.float64)
    for k in (1, 2, 5, 20):
        for lam in (0.3, 1.0):
            A = D.neumann_matrix(dFdh, dFdth, k, lam)
            if D.descent_condition(A, dFdh, dFdth)["holds"]:
                assert float((A @ g) @ (exact_A @ g)) >= 0


def test_spectral_radius_matches_eigenvalues(tuple_state):
    cell, x = make_problem(tuple_state, batch=2)
    gen = torch.Generator().manual_seed(4)
    z = tuple(
        torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in pdq._state.as_tuple(cell.z0(2))
    )
    z = z if tuple_state else z[0]
    rho = D.spectral_radius(cell, z, x, iters=200, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        # the dense Jacobian of sample b's map alone (the cell is per sample)
        zb = tuple(t[b : b + 1] for t in z) if tuple_state else z[b : b + 1]
        block = torch.autograd.functional.jacobian(
            lambda v, zb=zb, b=b: _part_major(cell(_from_part_major(v, zb), x[b : b + 1])),
            _part_major(zb),
        )
        assert block.shape == ((10, 10) if tuple_state else (6, 6))
        ref = torch.linalg.eigvals(block).abs().max()
        assert abs(float(rho[b]) - float(ref)) < 2e-2 * float(ref)


def test_cosine_similarity_handles_sequences_and_none():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    b = [torch.tensor([1.0, 0.0]), None]
    assert abs(D.cosine_similarity(a, b) - 1.0) < 1e-12
    assert abs(D.cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))) < 1e-12


def test_per_sample_cosine_is_the_cosine_of_each_row() -> None:
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(4, 3, 2, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g)]
    b = [torch.randn(4, 3, 2, generator=g, dtype=torch.float64), None]
    cos = D.per_sample_cosine(a, b)
    for i in range(4):
        va = torch.cat([a[0][i].reshape(-1), a[1][i].double()])
        vb = torch.cat([b[0][i].reshape(-1), torch.zeros(5, dtype=torch.float64)])  # type: ignore[index]
        assert float(cos[i]) == pytest.approx(float(va @ vb / (va.norm() * vb.norm())), rel=1e-12)
    assert float(D.per_sample_cosine(torch.zeros(1, 3), torch.ones(1, 3))[0]) == 0.0


@pytest.mark.parametrize("shape", [(3, 7, 4), (3, 4, 7)])
def test_descent_conditions_match_svd_norms(shape: tuple[int, int, int]) -> None:
    """The batched condition's left side is the spectral norm (largest singular value by SVD) of
    A(I − ∂F/∂h) − ∂F/∂θ for tall and wide ∂F/∂θ; the right side σ_min²/σ_max of ∂F/∂θ."""
    g = torch.Generator().manual_seed(5)
    b, p, n = shape
    A = torch.randn(b, p, n, generator=g, dtype=torch.float64)
    dFdh = 0.3 * torch.randn(b, n, n, generator=g, dtype=torch.float64)
    dFdth = torch.randn(b, p, n, generator=g, dtype=torch.float64)
    cond = D.descent_conditions(A, dFdh, dFdth)
    m = A @ (torch.eye(n, dtype=torch.float64) - dFdh) - dFdth
    assert torch.allclose(cond["lhs"], torch.linalg.matrix_norm(m, ord=2), rtol=1e-12)
    s = torch.linalg.svdvals(dFdth)
    assert torch.allclose(cond["rhs"], s[:, -1] ** 2 / s[:, 0], rtol=1e-12)
    again = D.descent_conditions(A, dFdh, dFdth, svals=s)
    assert all(torch.equal(cond[k], again[k]) for k in cond)
