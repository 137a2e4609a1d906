"""SHINE: Broyden's exported inverse estimate against a dense good-Broyden recurrence, the SHINE
gradient against its formula ``∂F/∂θᵀ(-Hᵀ g)`` and against the exact gradient where ``H`` is
exact, and the combinations a DEQ refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D
from phantomdeq._state import StateSpec

DT = torch.float64


def _dense_broyden(g, x0: torch.Tensor, max_iter: int, memory: int | None) -> torch.Tensor:
    """Limited-memory good Broyden written densely: ``H = -I + Σ u vᵀ`` over the kept pairs,
    step ``p = -H r``, pair of the current ``H``: ``v = Hᵀ s``, ``u = (s - H y) / vᵀy``; the
    pair of the oldest step leaves once ``memory`` are kept. ``max_iter`` evaluations of
    ``g`` make ``max_iter - 2`` pairs. Returns ``H`` (B, D, D)."""
    b, d = x0.shape
    eye = torch.eye(d, dtype=DT).expand(b, d, d)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def h_of() -> torch.Tensor:
        out = -eye.clone()
        for u, v in pairs:
            out = out + u.unsqueeze(2) * v.unsqueeze(1)
        return out

    x = x0
    r = g(x) - x
    for _ in range(max_iter - 2):
        H = h_of()
        s = -torch.bmm(H, r.unsqueeze(2)).squeeze(2)
        x = x + s
        r_new = g(x) - x
        y = r_new - r
        v = torch.bmm(H.transpose(1, 2), s.unsqueeze(2)).squeeze(2)
        denom = (v * y).sum(1, keepdim=True)
        u = (s - torch.bmm(H, y.unsqueeze(2)).squeeze(2)) / denom
        pairs.append((u, v))
        if memory is not None and len(pairs) > memory:
            pairs.pop(0)
        r = r_new
    return h_of()


@pytest.mark.parametrize(("max_iter", "memory"), [(3, None), (7, None), (9, 3)])
def test_broyden_exports_its_good_broyden_inverse(max_iter, memory):
    cell, x = make_problem(False, batch=3)
    xd = x.detach()

    def g(z):
        with torch.no_grad():
            return cell(z, xd)

    z0 = torch.zeros(3, 6, dtype=DT)
    sol = pdq.Broyden(max_iter=max_iter, tol=0.0, memory=memory).solve_with_inverse(g, z0)
    assert sol.niter == max_iter and sol.inverse is not None
    assert sol.inverse.rank == (max_iter - 2 if memory is None else memory)
    H = _dense_broyden(g, z0, max_iter, memory)
    torch.testing.assert_close(sol.inverse.dense(), H, rtol=1e-9, atol=1e-11)
    gvec = torch.randn(3, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    Ht_g = torch.bmm(H.transpose(1, 2), gvec.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(sol.inverse.rmatvec(gvec), Ht_g, rtol=1e-9, atol=1e-11)
    H_g = torch.bmm(H, gvec.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(sol.inverse.matvec(gvec), H_g, rtol=1e-9, atol=1e-11)
    # the plain call returns the same solution and no estimate
    plain = pdq.Broyden(max_iter=max_iter, tol=0.0, memory=memory)(g, z0)
    assert plain.inverse is None
    torch.testing.assert_close(plain.z, sol.z, rtol=0, atol=0)


def test_shine_gradient_is_minus_h_transpose_through_dF_dtheta(tuple_state):
    cell, x = make_problem(tuple_state)
    deq = pdq.DEQ(cell, solver=pdq.Broyden(max_iter=6, tol=0.0), grad=pdq.SHINE())
    z, info = deq(cell.z0(3), x)
    t = state_target(z)
    wrt = [*cell.parameters(), x]
    grads = torch.autograd.grad(inner(z, t), wrt)
    # dense: per sample v_i = -H_iᵀ g_i, then dL/dθ = J_θᵀ v with the Jacobians at h*
    H = info.inverse.dense()
    g = torch.cat([p.reshape(3, -1) for p in (t if tuple_state else (t,))], dim=1)
    v = -torch.bmm(H.transpose(1, 2), g.unsqueeze(2)).squeeze(2)
    vt = tuple(p.reshape(q.shape) for p, q in zip(_split_state(v, t), t)) if tuple_state else v
    expected = torch.autograd.grad(inner(cell(_detached(info.z), x), vt), wrt, allow_unused=True)
    assert D.relative_error(grads, expected) <= 1e-12
    exact = D.exact_gradient(cell, info.z, (x,), wrt, t)
    assert D.relative_error(grads, exact) > 1e-6  # an estimate, not the exact gradient


def _split_state(v: torch.Tensor, like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    sizes = [p[0].numel() for p in like]
    return list(torch.split(v, sizes, dim=1))


def _detached(z):
    return tuple(p.detach() for p in z) if isinstance(z, tuple) else z.detach()


class _Linear1D(nn.Module):
    """F(h, x) = w h + u x with a scalar state: one secant step makes Broyden's H exact."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.6]], dtype=DT))
        self.u = nn.Parameter(torch.tensor([[1.3, -0.4]], dtype=DT))

    def forward(self, h, x):
        return h @ self.w.T + x @ self.u.T


def test_shine_is_the_exact_gradient_where_the_inverse_estimate_is_exact():
    cell = _Linear1D()
    x = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    x.requires_grad_()
    deq = pdq.DEQ(cell, solver=pdq.Broyden(max_iter=20, tol=1e-13), grad=pdq.SHINE())
    z, info = deq(torch.zeros(4, 1, dtype=DT), x)
    # H = (w - 1)⁻¹ exactly (the secant of a linear scalar map)
    exact_inverse = torch.full((4, 1, 1), 1 / (0.6 - 1), dtype=DT)
    torch.testing.assert_close(info.inverse.dense(), exact_inverse)
    t = torch.randn(4, 1, dtype=DT, generator=torch.Generator().manual_seed(3))
    wrt = [*cell.parameters(), x]
    grads = torch.autograd.grad(inner(z, t), wrt)
    exact = D.exact_gradient(cell, info.z, (x,), wrt, t)
    assert D.relative_error(grads, exact) <= 1e-10


class _LinearND(nn.Module):
    """F(h, x) = W h + U x with ‖W‖₂ = 0.9 and a d-dimensional state."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, dtype=DT, generator=gen)
        self.w = nn.Parameter(0.9 * w / torch.linalg.matrix_norm(w, 2))
        self.u = nn.Parameter(torch.randn(d, 3, dtype=DT, generator=gen))

    def forward(self, h, x):
        return h @ self.w.T + x @ self.u.T


@pytest.mark.parametrize("d", [5, 20])
def test_on_a_linear_map_the_converged_inverse_estimate_is_not_the_true_inverse(d):
    # SHINE's docstring used to say H equals the true inverse for a linear F after enough
    # iterations with full memory. It does not: good Broyden enforces only the latest secant
    # equation, and a linear solve converges (in at most 2d steps) before H is pinned down.
    cell = _LinearND(d, seed=0)
    x = torch.randn(2, 3, dtype=DT, generator=torch.Generator().manual_seed(1)).requires_grad_()
    deq = pdq.DEQ(cell, solver=pdq.Broyden(max_iter=200, tol=1e-12), grad=pdq.SHINE())
    z, info = deq(torch.zeros(2, d, dtype=DT), x)
    assert info.niter <= 2 * d + 2 and info.inverse.rank <= info.niter  # full memory, converged
    with torch.no_grad():
        residual = torch.linalg.vector_norm(cell(z, x) - z, dim=1) / torch.linalg.vector_norm(
            z, dim=1
        )
    assert float(residual.max()) < 1e-11
    true_inverse = torch.linalg.inv(cell.w.detach() - torch.eye(d, dtype=DT))
    gap = torch.linalg.matrix_norm(info.inverse.dense() - true_inverse) / torch.linalg.matrix_norm(
        true_inverse
    )
    assert (gap > 0.1).all(), gap  # measured: 0.14-0.19 at d = 5, 0.37-0.38 at d = 20
    t = torch.randn(2, d, dtype=DT, generator=torch.Generator().manual_seed(3))
    wrt = [*cell.parameters(), x]
    grads = torch.autograd.grad(inner(z, t), wrt)
    exact = D.exact_gradient(cell, info.z, (x,), wrt, t)
    err = D.relative_error(grads, exact)
    assert err > 0.1  # measured: 0.17 at d = 5, 0.47 at d = 20
    flat = torch.cat([g.flatten() for g in grads])
    ref = torch.cat([g.flatten() for g in exact])
    assert float(flat @ ref / (flat.norm() * ref.norm())) > 0.8  # still a descent direction


def test_shine_needs_a_broyden_forward_and_no_cuda_graph():
    cell, x = make_problem(False)
    with pytest.raises(TypeError, match=r"DEQ: grad=SHINE\(\) .* needs solver=Broyden"):
        pdq.DEQ(cell, solver=pdq.Anderson(), grad=pdq.SHINE())
    with pytest.raises(TypeError, match=r"needs eval_solver=Broyden"):
        pdq.DEQ(
            cell,
            solver=pdq.Broyden(),
            eval_solver=pdq.FixedPoint(),
            grad=pdq.SHINE(),
            grad_in_eval=True,
        )
    with pytest.raises(ValueError, match=r"cuda_graph=True .* grad=SHINE\(\) needs"):
        pdq.DEQ(cell, solver=pdq.Broyden(tol=0.0), grad=pdq.SHINE(), cuda_graph=True)
    deq = pdq.DEQ(cell, solver=pdq.Broyden(), grad=pdq.OneStep())
    swap = deq.using(grad=pdq.SHINE(), solver=pdq.FixedPoint())
    with pytest.raises(TypeError, match=r"needs solver=Broyden"):
        swap.__enter__()
    with pytest.raises(ValueError, match=r"SHINE needs the forward solve's inverse"):
        pdq.SHINE().attach(cell, cell.z0(3), (x,), StateSpec.of(cell.z0(3)))
    # registered: the config's grad.name and the cost table reach it
    assert pdq.grad.ESTIMATORS["shine"] is pdq.SHINE
    assert isinstance(pdq.grad.from_name("shine"), pdq.SHINE)
    from phantomdeq.experiments import cost

    assert [m.name for m in cost.method_specs((5,)) if m.estimator == "shine"] == ["shine"]


def test_nonfinite_samples_get_the_plain_estimate():
    cell, x = make_problem(False, batch=3)
    xd = x.detach().clone()
    xd[1, 0] = float("nan")

    def g(z):
        return cell(z, xd)

    sol = pdq.Broyden(max_iter=6, tol=0.0).solve_with_inverse(g, torch.zeros(3, 6, dtype=DT))
    assert sol.nonfinite.tolist() == [False, True, False]
    H = sol.inverse.dense()
    assert bool(torch.isfinite(H).all())
    torch.testing.assert_close(H[1], -torch.eye(6, dtype=DT))  # reset to -I
    assert not torch.allclose(H[0], -torch.eye(6, dtype=DT))


def test_ift_started_from_shine_is_exact_and_starts_converged_where_h_is_exact(tuple_state):
    # a general cell: the start changes the path, not the converged (exact) gradient
    cell, x = make_problem(tuple_state)
    for solver in (pdq.GMRES(max_iter=40, tol=1e-13), pdq.FixedPoint(max_iter=300, tol=1e-14)):
        est = pdq.IFT(solver=solver, init="shine")
        deq = pdq.DEQ(cell, solver=pdq.Broyden(max_iter=40, tol=1e-14), grad=est)
        z, info = deq(cell.z0(3), x)
        t = state_target(z)
        wrt = [*cell.parameters(), x]
        grads = torch.autograd.grad(inner(z, t), wrt)
        assert D.relative_error(grads, D.exact_gradient(cell, info.z, (x,), wrt, t)) <= 1e-8
    # where H is exact, the start -Hᵀg is the solution: the first residual check converges
    lin = _Linear1D()
    xl = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    est = pdq.IFT(solver=pdq.GMRES(max_iter=10, tol=1e-12), init="shine")
    deq = pdq.DEQ(lin, solver=pdq.Broyden(max_iter=20, tol=1e-13), grad=est)
    z, info = deq(torch.zeros(4, 1, dtype=DT), xl)
    z.sum().backward()
    assert info.backward.result == "converged" and info.backward.niter == 1
    with pytest.raises(TypeError, match=r"grad=IFT\(\) .* needs solver=Broyden"):
        pdq.DEQ(lin, solver=pdq.Anderson(), grad=pdq.IFT(init="shine"))
    with pytest.raises(ValueError, match=r"IFT: init must be one of \('default', 'shine'\)"):
        pdq.IFT(init="warm")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")
@pytest.mark.filterwarnings("ignore::FutureWarning:torch.*")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_shine_under_torch_compile_is_the_eager_gradient():
    import torch._dynamo

    cell, x = make_problem(False)
    t = state_target(torch.zeros(3, 6, dtype=DT))

    def grads(run) -> list[torch.Tensor]:
        z, info = run(cell.z0(3), x)
        assert info.inverse is not None and info.inverse.rank == 4
        return list(torch.autograd.grad(inner(z, t), [*cell.parameters(), x]))

    deq = pdq.DEQ(cell, solver=pdq.Broyden(max_iter=6, tol=0.0), grad=pdq.SHINE())
    eager = grads(deq)
    torch._dynamo.reset()
    try:
        compiled = grads(torch.compile(deq, backend="eager"))
    finally:
        torch._dynamo.reset()
    assert D.relative_error(compiled, eager) <= 1e-12


@pytest.mark.filterwarnings("ignore:IFT backward solve did not reach:RuntimeWarning")
def test_gradient_monitor_measures_the_shine_gradient():
    import torch.nn.functional as F

    from phantomdeq.models import MDEQ, MDEQConfig
    from phantomdeq.train.monitor import GradientMonitor

    cfg = MDEQConfig(
        name="shine_monitor",
        channels=(8, 8),
        head_channels=(4, 8),
        final_channels=16,
        expansion=2,
        num_groups=4,
        dropout=0.3,
    )
    torch.manual_seed(0)
    solver = pdq.Broyden(max_iter=10, tol=1e-8)
    model = MDEQ(cfg, num_classes=10, in_channels=1, solver=solver, grad=pdq.SHINE()).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 6, 6, generator=gen, dtype=DT)
    y = torch.randint(0, 10, (3,), generator=gen)
    params = [p for p in model.deq.f.parameters() if p.requires_grad]

    def cell_grad(grad) -> torch.Tensor:
        model.deq.grad = grad
        loss = F.cross_entropy(model(x, generator=torch.Generator().manual_seed(5)).logits, y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    def tight() -> pdq.IFT:
        return pdq.IFT(solver=pdq.GMRES(max_iter=40, tol=1e-9))

    model.train()
    a, b = cell_grad(pdq.SHINE()), cell_grad(tight())
    model.deq.grad = pdq.SHINE()
    cos_direct = float(a @ b / (a.norm() * b.norm()))
    res = GradientMonitor(tight()).measure_classifier(
        model, x, y, generator=torch.Generator().manual_seed(5)
    )
    assert abs(res["cosine"] - cos_direct) < 1e-6
    assert res["cosine"] < 1.0 - 1e-6  # SHINE is an estimate
