"""Second-order gradients (``create_graph=True``) of every estimator against mathematics.

Quantities, with ``G = ∇_w L`` the first-order gradient w.r.t. ``w`` = (parameters of F, the
input x, and the parameters ψ of a head when the loss has one), computed by the DEQ:

* the Hessian-vector product ``Hᵀ r = ∇_w (G · r)`` (double backward), and
* the gradient of a gradient-norm penalty ``∇_w ||G||² = 2 Hᵀ G``,

with ``H = ∂G/∂w``. References (float64):

* IFT: the exact second derivatives of ``L(h*(θ, x), ψ)`` — ``h*`` written out as 150 steps of
  the (strongly contractive) iteration from zero, and the dense Hessian taken by ``torch.func``
  through it (exact to float64 at every order).
* UPG, NPG, OneStep: the explicit phantom formula with ``h*`` held fixed, i.e.
  ``G(w) = D(θ, x)ᵀ ∂L/∂Y`` with the dense phantom Jacobian ``D = dY/d(θ, x)`` (eq. 17 / 18)
  built from ``torch.autograd.functional.jacobian`` (``create_graph=True``), differentiated by
  autograd.
* BPTT: the dense Hessian of the hand-written unroll of the same iterations.
* All: central finite differences of the first-order gradient (and of the penalty).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jacrev

import phantomdeq as pdq
from core_problems import SmallCell, inner, make_problem, state_target
from phantomdeq import diagnostics as D
from phantomdeq._state import StateSpec

DT = torch.float64
TIGHT = 1e-15


def hessian(fn):
    """Dense Hessian by reverse-over-reverse (torch.func.hessian's forward mode imports a
    TorchScript decomposition that emits a DeprecationWarning)."""
    return jacrev(jacrev(fn))


def _tight_ift() -> pdq.IFT:
    return pdq.IFT(solver=pdq.FixedPoint(max_iter=500, tol=TIGHT))


def _tight_forward() -> pdq.FixedPoint:
    return pdq.FixedPoint(max_iter=500, tol=TIGHT)


# --------------------------------------------------------------------------- problem


class Problem:
    """Cell, input, loss target, optional head ψ; ``w`` lists everything differentiated."""

    def __init__(self, tuple_state: bool, head: bool) -> None:
        self.cell, self.x = make_problem(tuple_state)
        self.tuple_state = tuple_state
        z0 = self.cell.z0(self.x.shape[0])
        self.spec_z0 = z0
        self.t = state_target(z0)
        dim = sum(p[0].numel() for p in (z0 if isinstance(z0, tuple) else (z0,)))
        gen = torch.Generator().manual_seed(11)
        self.psi = (
            (0.7 * torch.randn(dim, 2, generator=gen, dtype=DT)).requires_grad_() if head else None
        )
        self.names = [n for n, _ in self.cell.named_parameters()]
        self.w = [*self.cell.parameters(), self.x] + ([self.psi] if head else [])
        assert isinstance(z0, tuple) == tuple_state  # the fixture builds what it says

    def loss(self, z, psi=None, t=None):
        psi = self.psi if psi is None else psi
        out = inner(z, self.t if t is None else t)
        if psi is not None:
            parts = z if isinstance(z, tuple) else (z,)
            flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
            out = out + 0.5 * torch.tanh(flat @ psi).square().sum()
        return out

    # flat vector <-> (params, x, psi)
    def vec(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.w])

    def split(self, vec):
        out, start = [], 0
        for p in self.w:
            out.append(vec[start : start + p.numel()].view_as(p))
            start += p.numel()
        params = dict(zip(self.names, out[: len(self.names)]))
        x = out[len(self.names)]
        psi = out[len(self.names) + 1] if self.psi is not None else None
        return params, x, psi

    def shift(self, direction, eps: float) -> None:
        """In-place w += eps * direction (finite differences)."""
        start = 0
        with torch.no_grad():
            for p in self.w:
                p.add_(eps * direction[start : start + p.numel()].view_as(p))
                start += p.numel()


@pytest.fixture(params=[False, True], ids=["linear_loss", "head"])
def head(request):
    return request.param


def _flatcat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def second_order(prob: Problem, deq: pdq.DEQ, r: torch.Tensor):
    """(G, Hᵀ r, ∇||G||²) from the DEQ, flat."""
    z, info = deq(prob.cell.z0(prob.x.shape[0]), prob.x)
    G = torch.autograd.grad(prob.loss(z), prob.w, create_graph=True)
    Gf = _flatcat(G)
    hvp = torch.autograd.grad(Gf @ r, prob.w, retain_graph=True)
    pen = torch.autograd.grad(Gf @ Gf, prob.w)
    return Gf.detach(), _flatcat(hvp), _flatcat(pen), info


def first_order(prob: Problem, deq: pdq.DEQ) -> torch.Tensor:
    z, _ = deq(prob.cell.z0(prob.x.shape[0]), prob.x)
    return _flatcat(torch.autograd.grad(prob.loss(z), prob.w))


def _directions(n: int, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=gen, dtype=DT)
    u = torch.randn(n, generator=gen, dtype=DT)
    return r / r.norm(), u / u.norm()


def check_finite_differences(prob, make_deq, G, hvp, pen, r, u, eps=1e-5, tol=1e-6):
    """Central differences along u of the first-order gradient and of the penalty:
    rᵀ (G(w+εu) − G(w−εu)) / 2ε = rᵀ H u = u · (Hᵀ r);  (P(w+εu) − P(w−εu)) / 2ε = u · ∇P."""
    prob.shift(u, eps)
    g_up = first_order(prob, make_deq())
    prob.shift(u, -2 * eps)
    g_down = first_order(prob, make_deq())
    prob.shift(u, eps)
    fd_h = float(r @ (g_up - g_down)) / (2 * eps)
    fd_p = float(g_up @ g_up - g_down @ g_down) / (2 * eps)
    scale_h = float(hvp.norm() * u.norm())
    scale_p = float(pen.norm() * u.norm())
    assert abs(fd_h - float(u @ hvp)) <= tol * scale_h
    assert abs(fd_p - float(u @ pen)) <= tol * scale_p


# --------------------------------------------------------------------------- IFT


def ift_reference(prob: Problem, steps: int = 150):
    """Gradient and dense Hessian of L(h*(θ, x), ψ), h* unrolled from zero (exact in float64)."""
    z0 = prob.cell.z0(prob.x.shape[0])

    def L(vec):
        params, x, psi = prob.split(vec)
        z = z0
        for _ in range(steps):
            z = functional_call(prob.cell, params, (z, x))
        return prob.loss(z, psi)

    vec = prob.vec()
    grad = torch.func.grad(L)(vec)
    H = hessian(L)(vec)
    return grad, H


def test_ift_second_order_equals_dense_hessian_of_the_implicit_map(tuple_state, head):
    prob = Problem(tuple_state, head)

    def make_deq():
        return pdq.DEQ(prob.cell, solver=_tight_forward(), grad=_tight_ift())

    r, u = _directions(prob.vec().numel())
    G, hvp, pen, info = second_order(prob, make_deq(), r)
    g_ref, H = ift_reference(prob)
    assert D.relative_error(H, H.T) <= 1e-12  # a true Hessian
    assert D.relative_error(G, g_ref) <= 1e-12
    assert D.relative_error(hvp, H.T @ r) <= 1e-10
    assert D.relative_error(pen, 2 * H.T @ g_ref) <= 1e-10
    # the parts w.r.t. the input x alone (not dominated by the parameters)
    n_par = sum(p.numel() for p in prob.cell.parameters())
    sl = slice(n_par, n_par + prob.x.numel())
    assert D.relative_error(hvp[sl], (H.T @ r)[sl]) <= 1e-10
    assert D.relative_error(pen[sl], (2 * H.T @ g_ref)[sl]) <= 1e-10
    check_finite_differences(prob, make_deq, G, hvp, pen, r, u)


def test_ift_second_order_on_a_three_parameter_problem():
    """The issue's shape of example: F(h) = tanh(a h + b x + c), three scalar parameters."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.tensor([0.7, -1.1, 0.3], dtype=DT))

        def forward(self, h, x):
            a, b, c = self.theta
            return torch.tanh(a * h + b * x + c)

    cell = Tiny()
    x = torch.linspace(-1.0, 1.0, 4, dtype=DT).reshape(4, 1)
    deq = pdq.DEQ(cell, solver=_tight_forward(), grad=_tight_ift())
    z, _ = deq(torch.zeros(4, 1, dtype=DT), x)
    (g,) = torch.autograd.grad(z.square().sum(), [cell.theta], create_graph=True)
    (second,) = torch.autograd.grad(g.sum(), [cell.theta])

    def L(theta):
        h = torch.zeros(4, 1, dtype=DT)
        for _ in range(200):
            h = torch.tanh(theta[0] * h + theta[1] * x + theta[2])
        return h.square().sum()

    H = hessian(L)(cell.theta.detach())
    assert D.relative_error(second, H.sum(dim=0)) <= 1e-10


def test_ift_first_order_is_unchanged_by_create_graph_and_reevaluates_nothing(tuple_state):
    """First order: no extra evaluation of f in the backward, the same numbers with and
    without create_graph, and exact against the dense implicit gradient."""
    prob = Problem(tuple_state, head=False)
    calls = {"n": 0}

    class Counting(torch.nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, z, x):
            calls["n"] += 1
            return self.cell(z, x)

    deq = pdq.DEQ(Counting(prob.cell), solver=_tight_forward(), grad=_tight_ift())
    z, info = deq(prob.cell.z0(3), prob.x)
    before = calls["n"]
    g_plain = torch.autograd.grad(prob.loss(z), prob.w)
    assert calls["n"] == before  # first-order backward: VJPs on the stored graph only
    z, info = deq(prob.cell.z0(3), prob.x)
    g_cg = torch.autograd.grad(prob.loss(z), prob.w, create_graph=True)
    assert D.relative_error([a.detach() for a in g_cg], g_plain) <= 1e-13
    exact = D.exact_gradient(prob.cell, info.z, (prob.x,), prob.w, prob.t)
    assert D.relative_error(g_plain, exact) <= 1e-10


def test_ift_third_order_is_refused():
    prob = Problem(False, head=True)
    deq = pdq.DEQ(prob.cell, solver=_tight_forward(), grad=_tight_ift())
    z, _ = deq(prob.cell.z0(3), prob.x)
    G = _flatcat(torch.autograd.grad(prob.loss(z), prob.w, create_graph=True))
    with pytest.raises(RuntimeError, match="third-order derivatives"):
        torch.autograd.grad(G @ G, prob.w, create_graph=True)


class _Captured(torch.nn.Module):
    """A cell using a tensor that requires grad but is neither a parameter nor an input."""

    def __init__(self, cell: SmallCell, extra: torch.Tensor) -> None:
        super().__init__()
        self.cell = cell
        self.extra = extra

    def forward(self, z, x, *more):
        bias = more[0] if more else self.extra
        return self.cell(z, x + bias)


def test_ift_second_order_refuses_a_captured_tensor_and_accepts_it_as_input():
    cell, x = make_problem(False)
    extra = (0.1 * torch.ones(3, 3, dtype=DT)).requires_grad_()
    f = _Captured(cell, extra)
    deq = pdq.DEQ(f, solver=_tight_forward(), grad=_tight_ift())
    z, _ = deq(cell.z0(3), x)
    t = state_target(z)
    # first order is fine: the captured tensor gets its gradient through y = F(h*)
    (ge,) = torch.autograd.grad(inner(z, t), [extra], retain_graph=True)
    assert ge.abs().sum() > 0
    with pytest.raises(RuntimeError, match="neither its parameters nor DEQ inputs"):
        torch.autograd.grad(inner(z, t), [*cell.parameters()], create_graph=True)
    # passed as an input, the same dependence is differentiated (checked by finite differences)
    z, _ = deq(cell.z0(3), x, extra)
    G = torch.autograd.grad(inner(z, t), [extra], create_graph=True)
    (hvp,) = torch.autograd.grad(G[0].sum(), [extra])
    eps = 1e-5
    fd = []
    for s in (eps, -eps):
        e2 = (extra.detach() + s).requires_grad_()
        z2, _ = deq(cell.z0(3), x, e2)
        fd.append(torch.autograd.grad(inner(z2, t), [e2])[0].sum())
    assert abs(float(hvp.sum()) - float(fd[0] - fd[1]) / (2 * eps)) <= 1e-6 * float(hvp.abs().sum())


def test_ift_second_order_through_a_nonleaf_input_and_stacked_layers():
    """x computed from a stem whose parameters are also differentiated; two DEQ layers in
    sequence (the second's input depends on the first's output)."""
    cell1, x = make_problem(False, seed=0)
    cell2, _ = make_problem(False, seed=1)
    x = x.detach()
    stem = torch.nn.Linear(3, 3, dtype=DT)
    to3 = torch.nn.Linear(6, 3, dtype=DT)
    deq1 = pdq.DEQ(cell1, solver=_tight_forward(), grad=_tight_ift())
    deq2 = pdq.DEQ(cell2, solver=_tight_forward(), grad=_tight_ift())
    mods = [stem, to3, cell1, cell2]
    w = [p for m in mods for p in m.parameters()]

    def forward_deq():
        z1, _ = deq1(cell1.z0(3), stem(x))
        z2, _ = deq2(cell2.z0(3), to3(z1))
        return z2

    def forward_unrolled(params):
        pstem, pto3, p1, p2 = params
        inj = functional_call(stem, pstem, (x,))
        z1 = cell1.z0(3)
        for _ in range(150):
            z1 = functional_call(cell1, p1, (z1, inj))
        inj2 = functional_call(to3, pto3, (z1,))
        z2 = cell2.z0(3)
        for _ in range(150):
            z2 = functional_call(cell2, p2, (z2, inj2))
        return z2

    t = state_target(cell2.z0(3))
    G = _flatcat(torch.autograd.grad(torch.sin(inner(forward_deq(), t)), w, create_graph=True))
    pen = _flatcat(torch.autograd.grad(G @ G, w))

    names = [[n for n, _ in m.named_parameters()] for m in mods]

    def L(vec):
        params, start = [], 0
        for m, ns in zip(mods, names):
            d = {}
            for n, p in zip(ns, m.parameters()):
                d[n] = vec[start : start + p.numel()].view_as(p)
                start += p.numel()
            params.append(d)
        return torch.sin(inner(forward_unrolled(params), t))

    vec = _flatcat([p.detach() for p in w])
    g_ref = torch.func.grad(L)(vec)
    H = hessian(L)(vec)
    assert D.relative_error(G.detach(), g_ref) <= 1e-12
    assert D.relative_error(pen, 2 * H @ g_ref) <= 1e-10


# --------------------------------------------------------------------------- phantom gradients


def _frozen(sol: pdq.Solution) -> pdq.FixedPoint:
    """A forward 'solver' returning a stored solution: h* held fixed across perturbations."""

    class Frozen:  # any object with __call__(g, z0) -> Solution is a solver
        def __call__(self, g, z0):
            return sol

    return Frozen()


def phantom_jacobian(prob, params, x, h_star, kind: str, k: int, lam: float):
    """Dense D = dY/d(θ, x) (N × P) of the phantom output Y with h* fixed, differentiable in
    (params, x): OneStep: J_θ; NPG (eq. 18): λ Σ_{j<k} B^j J_θ with B = λ J_h + (1 − λ) I at h*;
    UPG (eq. 17): along h_0 = h*, h_{t+1} = λ F(h_t) + (1 − λ) h_t, D_{t+1} = B_t D_t + λ J_θ(h_t).
    Also returns Y (value)."""
    spec = StateSpec.of(h_star)
    names = list(params)

    def F_flat(h_flat, *tensors):
        ps = dict(zip(names, tensors[:-1]))
        out = functional_call(
            prob.cell, ps, (spec.unflatten(h_flat.view(spec.batch, -1)), tensors[-1])
        )
        parts = out if isinstance(out, tuple) else (out,)  # batch-major, like spec.flatten
        return torch.cat([p.reshape(spec.batch, -1) for p in parts], dim=1).reshape(-1)

    def jac(h_flat):
        blocks = torch.autograd.functional.jacobian(
            F_flat, (h_flat, *params.values(), x), create_graph=True
        )
        n = h_flat.numel()
        J_h = blocks[0].reshape(n, n)
        J_w = torch.cat([b.reshape(n, -1) for b in blocks[1:]], dim=1)
        return J_h, J_w

    h = spec.flatten(h_star).reshape(-1).detach()
    n = h.numel()
    eye = torch.eye(n, dtype=DT)
    if kind == "onestep":
        _, J_w = jac(h)
        return J_w, F_flat(h, *params.values(), x)
    if kind == "npg":
        J_h, J_w = jac(h)
        B = lam * J_h + (1 - lam) * eye
        S, P = eye, eye
        for _ in range(k - 1):
            P = B @ P
            S = S + P
        return lam * S @ J_w, F_flat(h, *params.values(), x)
    Dm = None
    for _ in range(k):
        J_h, J_w = jac(h)
        B = lam * J_h + (1 - lam) * eye
        Dm = lam * J_w if Dm is None else B @ Dm + lam * J_w
        h = lam * F_flat(h, *params.values(), x) + (1 - lam) * h
    return Dm, h


def phantom_reference(prob, h_star, kind, k, lam):
    """G(w) = [Dᵀ ∂L/∂Y ; ∂L/∂ψ] with Y linearised at w0 (value Y0, Jacobian D(w0)): the
    first-order phantom gradient as a function of w, exact to second order at w0."""
    vec0 = prob.vec()
    n_fx = sum(p.numel() for p in prob.cell.parameters()) + prob.x.numel()
    params0, x0, _ = prob.split(vec0)
    D0, Y0 = (t.detach() for t in phantom_jacobian(prob, params0, x0, h_star, kind, k, lam))
    spec = StateSpec.of(h_star)

    def G(vec):
        params, x, psi = prob.split(vec)
        Dm, _ = phantom_jacobian(prob, params, x, h_star, kind, k, lam)
        Y = Y0 + D0 @ (vec[:n_fx] - vec0[:n_fx])
        L = prob.loss(spec.unflatten(Y.view(spec.batch, -1)), psi)
        if psi is None:
            (gY,) = torch.autograd.grad(L, [Y], create_graph=True)
            return Dm.T @ gY
        gY, gpsi = torch.autograd.grad(L, [Y, psi], create_graph=True)
        return torch.cat([Dm.T @ gY, gpsi.reshape(-1)])

    return G, vec0


PHANTOMS = {
    "onestep": (lambda k, lam: pdq.OneStep(), 1, 1.0),
    "npg_5_0.6": (lambda k, lam: pdq.NPG(k=k, lam=lam), 5, 0.6),
    "npg_3_1.0": (lambda k, lam: pdq.NPG(k=k, lam=lam), 3, 1.0),
    "upg_4_0.7": (lambda k, lam: pdq.UPG(k=k, lam=lam), 4, 0.7),
    "upg_ckpt_3_0.5": (lambda k, lam: pdq.UPG(k=k, lam=lam, checkpoint=True), 3, 0.5),
}


@pytest.mark.parametrize("name", PHANTOMS)
def test_phantom_second_order_equals_the_explicit_formula(name, tuple_state, head):
    make_est, k, lam = PHANTOMS[name]
    kind = name.split("_")[0]
    prob = Problem(tuple_state, head)
    sol = _tight_forward()(lambda z: prob.cell(z, prob.x), prob.cell.z0(3))
    assert sol.result == "converged"

    def make_deq():
        return pdq.DEQ(prob.cell, solver=_frozen(sol), grad=make_est(k, lam))

    r, u = _directions(prob.vec().numel())
    G, hvp, pen, _ = second_order(prob, make_deq(), r)
    G_ref, vec0 = phantom_reference(prob, sol.z, kind, k, lam)
    v = vec0.clone().requires_grad_()
    g_ref = G_ref(v)
    hvp_ref = torch.autograd.grad(g_ref @ r, v, retain_graph=True)[0]
    pen_ref = torch.autograd.grad(g_ref @ g_ref, v)[0]
    assert D.relative_error(G, g_ref.detach()) <= 1e-12
    assert D.relative_error(hvp, hvp_ref) <= 1e-10
    assert D.relative_error(pen, pen_ref) <= 1e-10
    if kind == "npg" and head:
        # NPG's output y = F(h*) reports the phantom Jacobian A (eq. 18) as dy/d(θ, x), at every
        # order; a loss nonlinear in y therefore differentiates G through A, whereas finite
        # differences in (θ, x) see y's true partial J_θ. Along ψ alone the two coincide.
        n_fx = sum(p.numel() for p in prob.cell.parameters()) + prob.x.numel()
        u = u.clone()
        u[:n_fx] = 0.0
        u = u / u.norm()
    check_finite_differences(prob, make_deq, G, hvp, pen, r, u)


@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_bptt_second_order_equals_dense_hessian_of_the_unroll(damping, tuple_state, head):
    prob = Problem(tuple_state, head)

    def make_deq():
        solver = pdq.FixedPoint(max_iter=12, tol=1e-30, damping=damping)
        return pdq.DEQ(prob.cell, solver=solver, grad=pdq.BPTT())

    r, u = _directions(prob.vec().numel())
    G, hvp, pen, info = second_order(prob, make_deq(), r)
    assert info.niter == 12
    z0 = prob.cell.z0(3)

    def L(vec):  # the same 11 damped updates, written out
        params, x, psi = prob.split(vec)
        z = z0
        for _ in range(11):
            fz = functional_call(prob.cell, params, (z, x))
            if isinstance(z, tuple):
                z = tuple(damping * a + (1 - damping) * b for a, b in zip(fz, z))
            else:
                z = damping * fz + (1 - damping) * z
        return prob.loss(z, psi)

    vec = prob.vec()
    g_ref = torch.func.grad(L)(vec)
    H = hessian(L)(vec)
    assert D.relative_error(G, g_ref) <= 1e-12
    assert D.relative_error(hvp, H.T @ r) <= 1e-10
    assert D.relative_error(pen, 2 * H.T @ g_ref) <= 1e-10
    check_finite_differences(prob, make_deq, G, hvp, pen, r, u)


def test_phantom_second_order_differs_from_the_true_one():
    """NPG's create_graph derivative is that of its own formula (h* fixed), not the implicit
    map's: the two differ on a problem where the first-order estimates already differ."""
    prob = Problem(False, head=True)
    r, _ = _directions(prob.vec().numel())
    _, hvp_npg, _, _ = second_order(
        prob, pdq.DEQ(prob.cell, solver=_tight_forward(), grad=pdq.NPG(k=2, lam=0.5)), r
    )
    _, hvp_ift, _, _ = second_order(
        prob, pdq.DEQ(prob.cell, solver=_tight_forward(), grad=_tight_ift()), r
    )
    assert D.relative_error(hvp_npg, hvp_ift) > 1e-2


# --------------------------------------------------------------------------- the guide's example


def test_guide_gradient_penalty_example():
    """The gradient-penalty example of docs/guides/second-order.md (formerly in the README),
    executed as written: a finite penalty, every backward and adjoint solve converged (no
    warning: pytest turns warnings into errors), gradients in .grad that include the penalty's
    second-order term."""
    guide = Path(__file__).resolve().parents[1] / "docs" / "guides" / "second-order.md"
    text = guide.read_text(encoding="utf-8")
    code = text[text.index("```python") + len("```python") : text.index("```\n\n")]
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, str(guide.name), "exec"), ns)
    cell, info, penalty = ns["cell"], ns["info"], ns["penalty"]
    assert math.isfinite(float(penalty.detach())) and float(penalty.detach()) > 0
    assert info.result == "converged" and info.backward.result == "converged"
    assert ns["deq"].grad.last_adjoint.result == "converged"
    with_penalty = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    z, _ = ns["deq"](torch.zeros_like(ns["x"]), ns["x"])
    z.square().mean().backward()
    assert D.relative_error([p.grad for p in cell.parameters()], with_penalty) > 1e-3


def test_unconverged_adjoint_solve_warns():
    prob = Problem(False, head=True)
    est = pdq.IFT(solver=pdq.FixedPoint(max_iter=500, tol=TIGHT))
    deq = pdq.DEQ(prob.cell, solver=_tight_forward(), grad=est)
    z, info = deq(prob.cell.z0(3), prob.x)
    G = _flatcat(torch.autograd.grad(prob.loss(z), prob.w, create_graph=True))
    est.solver = pdq.FixedPoint(max_iter=2, tol=TIGHT)  # the adjoint solve of the second order
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autograd.grad(G @ G, prob.w)
    assert any("IFT adjoint solve did not reach" in str(w.message) for w in caught)
    assert est.last_adjoint is not None and est.last_adjoint.result == "max_iter"
