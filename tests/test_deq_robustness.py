"""The DEQ at its edges: non-finite samples, empty batches, the smallest budget, gradients in
eval mode, the solver protocol, and the public module attributes."""

from __future__ import annotations

import math

import pytest
import torch

import phantomdeq as pdq
from core_problems import SmallCell, inner, make_problem, state_target

ESTIMATORS = {
    "ift": lambda: pdq.IFT(solver=pdq.FixedPoint(max_iter=200, tol=1e-12)),
    "upg": lambda: pdq.UPG(k=5, lam=0.5),
    "npg": lambda: pdq.NPG(k=5, lam=0.5),
    "onestep": lambda: pdq.OneStep(),
    "bptt": lambda: pdq.BPTT(),
}


def _rows(z, idx):
    return tuple(t[idx] for t in z) if isinstance(z, tuple) else z[idx]


def _forward_solver(est, check_every):
    if est == "bptt":
        return pdq.FixedPoint(max_iter=200, tol=1e-11, check_every=check_every)
    return pdq.Anderson(max_iter=200, tol=1e-11, check_every=check_every)


# --------------------------------------------------------------------------- non-finite samples


@pytest.mark.parametrize("check_every", [1, 4])
@pytest.mark.parametrize("est", ESTIMATORS)
def test_warn_returns_the_healthy_samples_solutions_and_exact_gradients(
    est, check_every, tuple_state
):
    """Sample 2 has a NaN input. With on_nonfinite="warn" the other samples are solved and
    differentiated exactly as in the batch without sample 2; no NaN reaches any gradient."""
    cell, x = make_problem(tuple_state, batch=4)
    x_bad = x.detach().clone()
    x_bad[2, 1] = math.nan
    x_bad.requires_grad_()
    keep = [0, 1, 3]
    params = list(cell.parameters())
    deq = pdq.DEQ(
        cell, solver=_forward_solver(est, check_every), grad=ESTIMATORS[est](), on_nonfinite="warn"
    )
    with pytest.warns(
        RuntimeWarning, match=r"non-finite values in 1 of 4 samples \(indices \[2\]\)"
    ):
        z, info = deq(cell.z0(4), x_bad)
    assert info.result == "nonfinite"
    assert info.nonfinite.tolist() == [False, False, True, False]
    assert info.converged.tolist() == [True, True, False, True]
    target = state_target(z)
    got = torch.autograd.grad(inner(_rows(z, keep), _rows(target, keep)), [x_bad, *params])

    x_ref = x.detach()[keep].clone().requires_grad_()
    ref_deq = pdq.DEQ(cell, solver=_forward_solver(est, check_every), grad=ESTIMATORS[est]())
    z_ref, info_ref = ref_deq(cell.z0(3), x_ref)
    assert info_ref.result == "converged"
    want = torch.autograd.grad(inner(z_ref, _rows(target, keep)), [x_ref, *params])

    for a, b in zip(pdq._state.as_tuple(_rows(z, keep)), pdq._state.as_tuple(z_ref)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert all(torch.isfinite(t).all() for t in pdq._state.as_tuple(z))
    assert all(torch.isfinite(g).all() for g in got)
    assert torch.allclose(got[0][keep], want[0], rtol=1e-10, atol=1e-13)
    assert torch.equal(got[0][2], torch.zeros_like(got[0][2]))
    for gp, wp in zip(got[1:], want[1:]):
        assert torch.allclose(gp, wp, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("est", ["upg", "bptt"])
def test_raise_names_the_bad_samples(est):
    cell, x = make_problem(False, batch=5)
    x = x.detach().clone()
    x[1, 0] = math.nan  # (an inf input would saturate tanh: a finite, healthy sample)
    x[4, 2] = math.nan
    deq = pdq.DEQ(cell, solver=_forward_solver(est, 1), grad=ESTIMATORS[est]())
    with pytest.raises(pdq.DEQError, match=r"2 of 5 samples \(indices \[1, 4\]\)") as err:
        deq(cell.z0(5), x)
    sol = err.value.solution  # the healthy samples can still be read off the failed solve
    assert sol.nonfinite.tolist() == [False, True, False, False, True]
    assert sol.converged.tolist() == [True, False, True, True, False]


# --------------------------------------------------------------------------- edge sizes


@pytest.mark.parametrize("est", ESTIMATORS)
def test_empty_batch_forward_and_backward(est, tuple_state):
    cell, x = make_problem(tuple_state, batch=3)
    x0 = x.detach()[:0].clone().requires_grad_()
    deq = pdq.DEQ(cell, solver=_forward_solver(est, 1), grad=ESTIMATORS[est]())
    z, info = deq(cell.z0(0), x0)
    for part, ref in zip(pdq._state.as_tuple(z), pdq._state.as_tuple(cell.z0(0))):
        assert part.shape == ref.shape
    assert info.result == "converged" and info.niter == 0
    inner(z, state_target(z)).backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in cell.parameters())
    deq.eval()
    z_eval, _ = deq(cell.z0(0), x0)
    assert pdq._state.as_tuple(z_eval)[0].shape[0] == 0


def test_the_smallest_budget_does_not_ignore_the_input():
    """max_iter=1 used to return z0 (a model ignoring its input); it is refused, and the
    smallest budget, 2, returns F(z0, x)."""
    with pytest.raises(ValueError, match="max_iter must be an integer >= 2"):
        pdq.FixedPoint(max_iter=1)
    cell, x = make_problem(False, batch=3)
    deq = pdq.DEQ(
        cell,
        solver=pdq.FixedPoint(max_iter=2, tol=0.0),
        grad=pdq.UPG(k=1, lam=1.0),
        eval_solver=pdq.Anderson(max_iter=2, tol=0.0),
    ).eval()
    z0 = cell.z0(3)
    with torch.no_grad():
        z, _ = deq(z0, x)
        z_other, _ = deq(z0, 2.0 * x)
        assert torch.allclose(z, cell(z0, x), rtol=0, atol=1e-15)
        assert not torch.allclose(z, z_other)


# --------------------------------------------------------------------------- eval-mode gradients


@pytest.mark.parametrize("est", ["ift", "upg", "bptt"])
def test_grad_in_eval_attaches_the_estimator_with_the_eval_solver(est):
    cell, x = make_problem(False, batch=3)
    calls = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, g, z0):
            calls.append("call")
            return self.inner(g, z0)

        def unroll(self, g, z0):
            calls.append("unroll")
            return self.inner.unroll(g, z0)

    deq = pdq.DEQ(
        cell,
        solver=pdq.FixedPoint(max_iter=3, tol=0.0),
        eval_solver=Spy(pdq.FixedPoint(max_iter=300, tol=1e-13)),
        grad=ESTIMATORS[est](),
        grad_in_eval=True,
    ).eval()
    z, info = deq(cell.z0(3), x)
    assert calls == (["unroll"] if est == "bptt" else ["call"])
    assert info.result == "converged"
    t = state_target(z)
    (gx,) = torch.autograd.grad(inner(z, t), [x])
    # exact input gradient by dense linear algebra (eq. 4) at the fixed point
    exact = pdq.diagnostics.exact_gradient(cell, info.z, (x,), [x], t)[0]
    tol = 1e-9 if est != "upg" else 0.5  # UPG is a phantom gradient: close, not exact
    assert pdq.diagnostics.relative_error(gx, exact) < tol
    assert pdq.diagnostics.cosine_similarity(gx, exact) > 0.95
    # the default: no graph in eval mode
    plain = pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=50), grad=ESTIMATORS[est]()).eval()
    z_plain, _ = plain(cell.z0(3), x)
    assert not z_plain.requires_grad


# --------------------------------------------------------------------------- the solver protocol


class Picard:
    """A user's solver written from scratch: no phantomdeq base class."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, g, z0):
        with torch.no_grad():
            z = z0
            for _ in range(self.n):
                z = g(z)
            r = torch.linalg.vector_norm(g(z) - z, dim=1)
        return pdq.Solution(
            z=z,
            nstep=torch.full((z.shape[0],), self.n),
            residual=r,
            abs_residual=r,
            rel_residual=r / z.norm(dim=1),
            converged=r <= 1e-10,
            result="converged" if bool((r <= 1e-10).all()) else "max_iter",
            niter=self.n,
        )


def test_any_object_with_the_call_signature_is_a_solver():
    cell, x = make_problem(False, batch=3)
    assert isinstance(Picard(5), pdq.Solver) and not isinstance(Picard(5), pdq.UnrollingSolver)
    assert isinstance(pdq.FixedPoint(), pdq.UnrollingSolver)
    deq = pdq.DEQ(cell, solver=Picard(200), grad=pdq.UPG(k=3, lam=0.5))
    z, info = deq(cell.z0(3), x)
    assert info.result == "converged" and info.nonfinite.tolist() == [False] * 3
    ref = pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=200, tol=1e-13), grad=pdq.UPG(k=3, lam=0.5))
    z_ref, _ = ref(cell.z0(3), x)
    assert torch.allclose(z, z_ref, atol=1e-12)
    (g1,) = torch.autograd.grad(inner(z, state_target(z)), [x])
    (g2,) = torch.autograd.grad(inner(z_ref, state_target(z)), [x])
    assert torch.allclose(g1, g2, atol=1e-12)
    with pytest.raises(TypeError, match="needs solver=FixedPoint"):
        pdq.DEQ(cell, solver=Picard(5), grad=pdq.BPTT())


def test_using_replaces_components_temporarily_and_validates_them():
    cell, x = make_problem(False, batch=2)
    fp = pdq.FixedPoint(max_iter=100, tol=1e-12)
    deq = pdq.DEQ(cell, solver=fp, grad=pdq.UPG())
    with deq.using(solver=Picard(100), grad=pdq.OneStep()):
        assert isinstance(deq.solver, Picard) and isinstance(deq.grad, pdq.OneStep)
        deq(cell.z0(2), x)
    assert deq.solver is fp and isinstance(deq.grad, pdq.UPG)
    with pytest.raises(TypeError, match="DEQ: solver must be a solver"), deq.using(solver=42):
        pass
    with (
        pytest.raises(TypeError, match="needs solver=FixedPoint"),
        deq.using(solver=Picard(3), grad=pdq.BPTT()),
    ):
        pass
    assert deq.solver is fp


def test_submodules_are_attributes():
    import phantomdeq

    assert phantomdeq.nn.SpectralNorm is pdq.nn.norms.SpectralNorm
    assert phantomdeq.models.MDEQ is not None
    assert phantomdeq.AutocastCell is phantomdeq.precision.AutocastCell
    assert "models" in phantomdeq.__all__ and "nn" in phantomdeq.__all__


def test_smallcell_is_per_sample():
    """The premise of the non-finite tests: SmallCell treats samples independently."""
    cell, x = make_problem(True, batch=3)
    z = tuple(torch.randn_like(t) for t in cell.z0(3))
    full = cell(z, x)
    one = cell(tuple(t[1:2] for t in z), x[1:2])
    assert all(torch.allclose(a[1:2], b, atol=1e-15) for a, b in zip(full, one))
    _ = SmallCell
