"""Forward solvers: convergence, outcomes, per-sample bookkeeping and robustness."""

from __future__ import annotations

import json
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
    assert s1.result == s2.result == "converged"
    # norms and inner products summed part by part round differently from the flat ones, so a
    # residual at the tolerance may take one step more: then both are within tol of z*
    assert abs(s1.niter - s2.niter) <= 1
    assert torch.allclose(joined, s1.z, atol=1e-12 if s1.niter == s2.niter else 1e-8)


@pytest.mark.parametrize("name", ALL)
def test_reports_max_iter_on_a_problem_it_cannot_solve(name):
    g, z0 = contractive_problem(rho=0.999, d=60)
    sol = ALL[name](max_iter=3, tol=1e-12)(g, z0)
    assert sol.result == "max_iter"
    assert sol.niter == 3
    assert not bool(sol.converged.any())


def recording(g):
    """``g`` that records every point it is evaluated at (the solver's iterates, in order)."""
    seen = []

    def wrapped(z):
        seen.append(z.clone())
        return g(z)

    return wrapped, seen


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("check_every", [1, 4])
def test_returns_per_sample_best_iterate(name, check_every):
    """Sample 0 converges; sample 1 is an expanding oscillation. For every sample the returned
    iterate is the one, among all points g was evaluated at, with the smallest true residual;
    ``residual`` is that residual and ``nstep`` its (1-based) evaluation index."""
    scale = torch.tensor([0.5, -1.7], dtype=torch.float64)[:, None]

    def g(z):
        return scale * z + 1.0

    z0 = torch.full((2, 3), 0.1, dtype=torch.float64)
    gr, seen = recording(g)
    sol = ALL[name](max_iter=40, tol=1e-9, stop="abs", check_every=check_every)(gr, z0)
    xs = torch.stack(seen)  # (niter, B, D)
    assert xs.shape[0] == sol.niter
    true = torch.linalg.vector_norm(g(xs) - xs, dim=2)  # (niter, B)
    best = true.argmin(dim=0)
    for b in range(2):
        assert torch.equal(sol.z[b], xs[best[b], b])
        assert float(sol.abs_residual[b]) == pytest.approx(float(true[best[b], b]), rel=1e-12)
        assert int(sol.nstep[b]) == int(best[b]) + 1
    if name == "fixed_point":
        # sample 1 diverges under plain iteration: the starting point is its best iterate
        assert torch.equal(sol.z[1], z0[1])
        assert int(sol.nstep[1]) == 1
        assert sol.converged.tolist() == [True, False]
        assert sol.result == "max_iter" and sol.niter == 40
    assert float(sol.residual[0]) <= 1e-9


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_values_stop_the_solver(name):
    def g(z):
        return z * float("inf")

    sol = ALL[name](max_iter=20, tol=1e-6)(g, torch.ones(2, 3))
    assert sol.result == "nonfinite"
    assert sol.niter <= 2
    assert sol.nonfinite.tolist() == [True, True]
    assert not bool(sol.converged.any())
    assert torch.equal(sol.z, torch.ones(2, 3))  # no finite residual was ever measured
    assert math.isnan(sol.trace[-1])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("check_every", [1, 4])
def test_a_nonfinite_sample_is_frozen_and_the_others_converge(name, check_every):
    """One sample's input is NaN: it is marked and frozen, the others reach their own fixed
    points exactly as in a batch without it (same iterates: every product is per sample)."""
    g_all, _ = contractive_problem(batch=5, d=16, seed=3)
    c = torch.zeros(5, 16, dtype=torch.float64)
    c[2, 7] = float("nan")

    def g(z):
        return g_all(z) + c

    keep = [0, 1, 3, 4]

    def g_healthy(z):
        full = torch.zeros(5, 16, dtype=torch.float64)
        full[keep] = z
        return g_all(full)[keep]

    z0 = torch.zeros(5, 16, dtype=torch.float64)
    solver = ALL[name](max_iter=100, tol=1e-10, check_every=check_every)
    sol = solver(g, z0)
    ref = solver(g_healthy, z0[keep])
    assert sol.result == "nonfinite"
    assert sol.nonfinite.tolist() == [False, False, True, False, False]
    assert sol.converged.tolist() == [True, True, False, True, True]
    assert ref.result == "converged"
    assert torch.allclose(sol.z[keep], ref.z, rtol=0, atol=1e-13)
    assert torch.equal(sol.z[2], z0[2]) and math.isinf(float(sol.residual[2]))
    assert sol.niter == ref.niter
    assert torch.equal(sol.nstep[keep], ref.nstep)
    assert all(math.isfinite(t) for t in sol.trace)  # the trace excludes the marked sample


def test_a_sample_that_converged_before_turning_nonfinite_keeps_its_solution():
    """Sample 0 converges at once, then blows up while sample 1 is still iterating."""
    calls = []

    def g(z):
        calls.append(1)
        out = torch.stack((torch.full_like(z[0], 1.0), 0.9 * z[1] + 0.1))
        if len(calls) > 4:
            out[0] = float("inf")
        return out

    sol = pdq.FixedPoint(max_iter=200, tol=1e-6, stop="abs")(g, torch.zeros(2, 2))
    assert sol.result == "converged"
    assert sol.nonfinite.tolist() == [False, False]
    assert torch.equal(sol.z[0], torch.ones(2))


@pytest.mark.parametrize("name", ALL)
def test_check_every_4_checks_convergence_every_4_steps(name):
    """The CUDA default, run on CPU: the stop test (converged or non-finite) runs on iterations
    4, 8, ... only; the best iterate is still tracked every iteration."""
    g, z0 = contractive_problem(batch=3, d=20, rho=0.5, seed=1)
    every = ALL[name](max_iter=100, tol=1e-8, check_every=4)(g, z0)
    each = ALL[name](max_iter=100, tol=1e-8, check_every=1)(g, z0)
    assert every.result == each.result == "converged"
    assert every.niter % 4 == 0 and each.niter <= every.niter < each.niter + 4
    assert every.trace[: each.niter] == each.trace
    # the returned iterate is the best of all niter iterates, per sample
    assert bool((every.residual <= each.residual).all())
    true = torch.linalg.vector_norm(g(every.z) - every.z, dim=1)
    assert torch.allclose(every.abs_residual, true, rtol=1e-10, atol=0)
    # a run cut by max_iter between two checks stops at max_iter
    cut = ALL[name](max_iter=6, tol=0.0, check_every=4)(g, z0)
    assert cut.niter == 6 and cut.result == "max_iter"


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
        (lambda: pdq.FixedPoint(max_iter=0), "max_iter must be an integer >= 2"),
        (lambda: pdq.FixedPoint(max_iter=1), "max_iter must be an integer >= 2"),
        (lambda: pdq.FixedPoint(tol=-1.0), "tol"),
        (lambda: pdq.FixedPoint(stop="max"), "stop"),
        (lambda: pdq.FixedPoint(damping=0.0), "damping"),
        (lambda: pdq.FixedPoint(damping=1.5), "damping"),
        (lambda: pdq.Anderson(m=0), "m"),
        (lambda: pdq.Anderson(beta=0.0), "beta"),
        (lambda: pdq.Anderson(lam=-1.0), "lam"),
        (lambda: pdq.Broyden(memory=0), "memory"),
        (lambda: pdq.Anderson(tol=math.nan), "tol"),
        (lambda: pdq.Anderson(check_every=0), "check_every"),
        (
            lambda: from_name("newton"),
            "unknown solver 'newton'; allowed: fixed_point, anderson, broyden",
        ),
        (lambda: from_name("anderson", window=3), "unknown option(s) ['window']"),
    ],
)
def test_bad_solver_values_raise_value_error_naming_the_field(factory, message):
    with pytest.raises(ValueError) as err:
        factory()
    assert message in str(err.value)


@pytest.mark.parametrize(
    "factory,message",
    [
        (lambda: pdq.FixedPoint(max_iter=2.0), "FixedPoint: max_iter must be an integer"),
        (lambda: pdq.FixedPoint(max_iter=True), "FixedPoint: max_iter must be an integer"),
        (lambda: pdq.Anderson(tol="1e-4"), "Anderson: tol must be a finite number"),
        (lambda: pdq.Anderson(stop=1), "Anderson: stop must be one of ('abs', 'rel')"),
        (lambda: pdq.Anderson(m=2.5), "Anderson: m must be an integer"),
        (lambda: pdq.Broyden(memory="4"), "Broyden: memory must be an integer"),
        (lambda: pdq.FixedPoint(damping=None), "FixedPoint: damping must be a finite number"),
        (lambda: from_name(3), "solver name must be a str"),
    ],
)
def test_bad_solver_types_raise_type_error_naming_the_field(factory, message):
    with pytest.raises(TypeError) as err:
        factory()
    assert message in str(err.value)


@pytest.mark.parametrize("cls", [pdq.FixedPoint, pdq.Anderson, pdq.Broyden])
def test_solver_options_are_keyword_only(cls):
    with pytest.raises(TypeError, match="positional"):
        cls(30, 1e-4)


def test_from_name_builds_each_solver():
    assert isinstance(from_name("fixed_point", damping=0.5), pdq.FixedPoint)
    assert isinstance(from_name("Anderson", m=3), pdq.Anderson)
    assert isinstance(from_name("broyden", memory=4), pdq.Broyden)


def test_result_is_a_str_enum():
    g, z0 = contractive_problem(batch=2, d=5)
    sol = pdq.Anderson(max_iter=50, tol=1e-8)(g, z0)
    assert sol.result is pdq.SolveResult.CONVERGED
    assert sol.result == "converged" and sol.result != "max_iter"
    assert f"{sol.result}" == "converged" and str(sol.result) == "converged"
    assert json.dumps({"result": sol.result}) == '{"result": "converged"}'
    assert {r.value for r in pdq.SolveResult} == {"converged", "max_iter", "nonfinite"}
    with pytest.raises(ValueError, match="Solution.result must be one of"):
        pdq.Solution(
            z=z0, nstep=sol.nstep, residual=sol.residual, abs_residual=sol.residual,
            rel_residual=sol.residual, converged=sol.converged, result="done",
        )  # fmt: skip


# ---------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", ALL)
def test_max_iter_2_returns_the_image_of_z0(name):
    """The smallest budget: the solver evaluates g at z0 and at g(z0) and returns g(z0) when its
    residual is the smaller one, with that true residual (never z0 with the map ignored)."""
    g, z0 = contractive_problem(batch=3, d=10)
    sol = ALL[name](max_iter=2, tol=0.0)(g, z0)
    gz0 = g(z0)
    assert sol.niter == 2 and sol.result == "max_iter"
    assert torch.allclose(sol.z, gz0, rtol=0, atol=1e-15)
    true = torch.linalg.vector_norm(g(gz0) - gz0, dim=1)
    assert torch.allclose(sol.abs_residual, true, rtol=1e-12, atol=0)
    assert sol.nstep.tolist() == [2, 2, 2]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
def test_empty_batch_returns_empty_results(name, tuple_state):
    calls = []

    def g(z):
        calls.append(1)
        return z

    z0 = (torch.zeros(0, 2, 3), torch.zeros(0, 4)) if tuple_state else torch.zeros(0, 5)
    sol = ALL[name](max_iter=10, tol=1e-6)(g, z0)
    if tuple_state:
        assert sol.z[0].shape == (0, 2, 3) and sol.z[1].shape == (0, 4)
    else:
        assert sol.z.shape == (0, 5)
    for t in (sol.nstep, sol.residual, sol.abs_residual, sol.converged, sol.nonfinite):
        assert t.shape == (0,)
    assert sol.result == "converged" and sol.niter == 0 and sol.trace == []
    assert calls == []


def _broyden_reference(g, z0, n_iter, memory):
    """Plain limited-memory good Broyden in float64, per sample: a dense inverse-Jacobian
    estimate H = -I + Σ u vᵀ over the last `memory` pairs; step p = -H r; after each step the
    pair v = Hᵀ s, u = (s - H y) / (vᵀ y) of the current H is appended and the oldest dropped.
    The points g is evaluated at, (n_iter, B, D)."""
    z0 = z0.double()
    d = z0.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    out = []
    for b in range(z0.shape[0]):

        def gb(x, b=b):
            full = torch.zeros_like(z0)
            full[b] = x
            return g(full)[b]

        pairs = []

        def H(pairs=pairs):
            return eye.neg() + sum((torch.outer(u, v) for u, v in pairs), torch.zeros_like(eye))

        x = z0[b].clone()
        r = gb(x) - x
        pts = [x.clone()]
        p = -H() @ r
        for _ in range(n_iter - 1):
            x = x + p
            pts.append(x.clone())
            r_new = gb(x) - x
            s, y = p, r_new - r
            Hk = H()
            v = Hk.T @ s
            u = (s - Hk @ y) / (v @ y)
            pairs.append((u, v))
            if memory is not None and len(pairs) > memory:
                pairs.pop(0)
            p = -H() @ r_new
            r = r_new
        out.append(torch.stack(pts))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("memory", [1, 3, 11, 12, None])
def test_limited_memory_broyden_matches_a_dense_reference_iterate_by_iterate(memory):
    """Against :func:`_broyden_reference`, in float64. 14 iterations make 12 pairs: memory 1
    or 3 evict many times, memory 11 once (these run on stored pairs); memory 12 and None never
    evict (they run on the stored residuals)."""
    g, z0 = contractive_problem(batch=3, d=8, rho=0.95, seed=4)
    z0 = z0 + 0.3
    n_iter = 14
    gr, seen = recording(g)
    sol = pdq.Broyden(max_iter=n_iter, tol=0.0, memory=memory)(gr, z0)
    assert sol.niter == n_iter
    got = torch.stack(seen)
    want = _broyden_reference(g, z0, n_iter, memory)
    err = (got - want).norm(dim=2) / want.norm(dim=2)
    assert float(err.max()) < 1e-10, err


@pytest.mark.parametrize("memory", [3, None])
def test_broyden_float32_iterates_stay_within_rounding_of_the_reference(memory):
    """In float32, every iterate is within float32 rounding of the float64 reference's (the
    same problem evaluated in float64 at the float32 iterates): the solver's products and small
    per-sample algebra lose nothing beyond rounding (a lower-precision history or a lost term
    would show at 1e-3 or worse)."""
    g, z0 = contractive_problem(batch=3, d=64, rho=0.95, seed=5)
    z0 = z0 + 0.3
    n_iter = 16

    def g32(z):
        return g(z.double()).float()

    gr, seen = recording(g32)
    pdq.Broyden(max_iter=n_iter, tol=0.0, memory=memory)(gr, z0.float())
    got = torch.stack(seen).double()
    want = _broyden_reference(g, z0, n_iter, memory)
    err = (got - want).norm(dim=2) / want.norm(dim=2)
    assert float(err.max()) < 1e-5, err


def _anderson_reference(g, z0, n_iter, m, beta, lam):
    """Plain type-II Anderson in float64, per sample: the last ``m`` residuals G_i = g(x_i) - x_i
    and mixed images Y_i = beta g(x_i) + (1 - beta) x_i in lists, the full Gram matrix, the
    bordered system [[0, 1ᵀ], [1, GGᵀ + lam·mean(diag)·I]] [μ; α] = [1; 0], x = Σ α_i Y_i. The
    points g is evaluated at, (n_iter, B, D)."""
    z0 = z0.double()
    out = []
    for b in range(z0.shape[0]):

        def gb(x, b=b):
            full = torch.zeros_like(z0)
            full[b] = x
            return g(full.to(z0.dtype))[b].double()

        x = z0[b].clone()
        Gs, Ys, pts = [], [], []
        for _ in range(n_iter):
            pts.append(x.clone())
            fx = gb(x)
            Gs.append(fx - x)
            Ys.append(beta * fx + (1 - beta) * x)
            Gs, Ys = Gs[-m:], Ys[-m:]
            n = len(Gs)
            if n == 1:
                x = Ys[0].clone()
                continue
            Gm = torch.stack(Gs)
            H = torch.zeros(n + 1, n + 1, dtype=torch.float64)
            H[0, 1:] = H[1:, 0] = 1.0
            gram = Gm @ Gm.T
            H[1:, 1:] = gram + lam * gram.diagonal().mean() * torch.eye(n, dtype=torch.float64)
            rhs = torch.zeros(n + 1, dtype=torch.float64)
            rhs[0] = 1.0
            alpha = torch.linalg.solve(H, rhs)[1:]
            x = alpha @ torch.stack(Ys)
        out.append(torch.stack(pts))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("beta", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_anderson_matches_a_dense_reference_iterate_by_iterate(beta, dtype):
    """Against :func:`_anderson_reference` (float64), 16 iterations with m = 3 (the ring
    buffer wraps several times): every point the solver evaluates g at equals the reference's,
    to 1e-10 relative in float64 and within float32 rounding (1e-5 relative) in float32."""
    g64, z0 = contractive_problem(batch=3, d=24, rho=0.95, seed=6)
    z0 = z0 + 0.3

    def g(z):
        return g64(z.double()).to(z.dtype)

    n_iter = 16
    gr, seen = recording(g)
    pdq.Anderson(max_iter=n_iter, tol=0.0, m=3, beta=beta, lam=1e-4)(gr, z0.to(dtype))
    got = torch.stack(seen).double()
    want = _anderson_reference(g64, z0, n_iter, 3, beta, 1e-4)
    err = (got - want).norm(dim=2) / want.norm(dim=2)
    assert float(err.max()) < (1e-10 if dtype == torch.float64 else 1e-5), err


# ---------------------------------------------------------------------- low precision


class LinearCell(torch.nn.Module):
    """tanh(W z + x) with ||W||_2 = 0.8 (a contraction)."""

    def __init__(self, d=32, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=gen)
        self.lin = torch.nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(0.8 * w / torch.linalg.matrix_norm(w, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


LOW = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_low_precision_state_converges_from_zero(name, dtype):
    """fp16/bf16 states from the zero start: the tolerance is the dtype's machine epsilon
    (relative), the floor set by rounding the state itself."""
    cell = LinearCell().to(dtype)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    tol = torch.finfo(dtype).eps
    sol = ALL[name](max_iter=60, tol=tol)(lambda z: cell(z, x), torch.zeros(4, 32, dtype=dtype))
    assert sol.result == "converged", (sol.result, sol.rel_residual)
    assert sol.z.dtype == dtype and sol.residual.dtype == torch.float32
    # the residual is that of the returned state, evaluated in float32
    z = sol.z
    true = torch.linalg.vector_norm((cell(z, x) - z).float(), dim=1) / z.float().norm(dim=1)
    assert torch.allclose(sol.rel_residual, true, rtol=1e-3, atol=1e-7)
    ref = pdq.Anderson(max_iter=100, tol=1e-10)(
        lambda z: LinearCell()(z, x.double().float()), torch.zeros(4, 32)
    ).z
    assert float((z.float() - ref).norm() / ref.norm()) < 20 * tol


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_fp32_state_with_an_autocast_cell_converges(name, dtype):
    cell = pdq.AutocastCell(LinearCell(), dtype=dtype)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    sol = ALL[name](max_iter=60, tol=torch.finfo(dtype).eps)(
        lambda z: cell(z, x), torch.zeros(4, 32)
    )
    assert sol.result == "converged"
    assert sol.z.dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
def test_solver_arithmetic_ignores_the_callers_autocast(name):
    """Under an outer bf16 autocast the state stays float32 (Anderson's mixing is a bmm, which
    autocast would run in bf16), while f still runs under the caller's autocast."""
    inner = LinearCell()
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, z, x):
            seen.append((z.dtype, torch.is_autocast_enabled("cpu")))
            return inner(z, x).to(z.dtype)

    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = ALL[name](max_iter=60, tol=1e-2)(lambda z: Probe()(z, x), torch.zeros(4, 32))
    assert sol.result == "converged"
    assert sol.z.dtype == torch.float32
    assert set(seen) == {(torch.float32, True)}


def test_freeze_converged_keeps_each_samples_first_iterate_under_tol() -> None:
    """z = a z + b per sample: z_t = z* (1 − aᵗ) from z_0 = 0 (z* = b / (1 − a)); the relative
    residual of z_t is (1 − a)·aᵗ / (1 − aᵗ). With freeze_converged each sample keeps the first
    iterate under tol although the slow sample keeps the batch iterating; without it the fast
    sample's later (better) iterate is returned."""
    a = torch.tensor([[0.1], [0.9]], dtype=torch.float64)
    b = torch.ones(2, 1, dtype=torch.float64)

    def g(z: torch.Tensor) -> torch.Tensor:
        return a * z + b

    tol = 1e-6
    first = []
    for ai in (0.1, 0.9):
        t = 1
        while (1 - ai) * ai**t / (1 - ai**t) >= tol:
            t += 1
        first.append(t)
    z0 = torch.zeros(2, 1, dtype=torch.float64)
    frozen = pdq.FixedPoint(max_iter=400, tol=tol, freeze_converged=True)(g, z0)
    zstar = b / (1 - a)
    for i, t in enumerate(first):
        expected = zstar[i] * (1 - a[i] ** t)
        assert torch.allclose(frozen.z[i], expected, rtol=1e-12)
        assert int(frozen.nstep[i]) == t + 1  # evaluation t + 1 measures z_t
    assert bool(frozen.converged.all())
    plain = pdq.FixedPoint(max_iter=400, tol=tol)(g, z0)
    assert float((plain.z[0] - zstar[0]).abs()) < float((frozen.z[0] - zstar[0]).abs()) / 100
    with pytest.raises(TypeError, match="freeze_converged"):
        pdq.FixedPoint(freeze_converged=1)  # type: ignore[arg-type]
