"""A DEQ called inside the caller's ``torch.autocast`` (the usual mixed-precision idiom): every
solver with every estimator runs, ``f`` runs under the autocast, the state and the solvers'
arithmetic keep the state's dtype (float32), and the gradients are finite and close to the
float32 ones. Outside autocast a cell of the wrong dtype is still refused."""

from __future__ import annotations

import warnings

import pytest
import torch

import phantomdeq as pdq
from core_problems import inner, state_target
from phantomdeq.diagnostics import cosine_similarity
from phantomdeq.solvers.graphed import EagerCapture, GraphedSolves

BF16 = torch.bfloat16

SOLVERS = {
    "fixed_point": lambda: pdq.FixedPoint(max_iter=40, tol=1e-5),
    "anderson": lambda: pdq.Anderson(max_iter=30, tol=1e-5),
    "broyden": lambda: pdq.Broyden(max_iter=30, tol=1e-5),
}
ESTIMATORS = {
    "ift": lambda: pdq.IFT(warn_unconverged=False),
    "ift_shine": lambda: pdq.IFT(init="shine", warn_unconverged=False),
    "upg": lambda: pdq.UPG(k=4, lam=0.8),
    "upg_auto": lambda: pdq.UPG(k="auto", tol=1e-2, k_max=8),
    "npg": lambda: pdq.NPG(k=4, lam=0.8),
    "npg_auto": lambda: pdq.NPG(k="auto", tol=1e-2, k_max=8),
    "onestep": lambda: pdq.OneStep(),
    "bptt": lambda: pdq.BPTT(),
    "shine": lambda: pdq.SHINE(),
}
#: estimators that need a particular forward solver (the DEQ refuses the others)
NEEDS = {"bptt": "fixed_point", "shine": "broyden", "ift_shine": "broyden"}
CASES = [(s, e) for s in SOLVERS for e in ESTIMATORS if NEEDS.get(e, s) == s]


def _solver(solver: str, grad: str):
    if grad == "shine":
        # SHINE's gradient is Broyden's inverse estimate along the solve's own trajectory: it
        # matches between precisions when both solves stop at a tolerance a bfloat16 cell can
        # reach (past it, bfloat16's secant updates are rounding noise and the estimate
        # differs -- as it differs between any two trajectories)
        return pdq.Broyden(max_iter=30, tol=1e-2)
    return SOLVERS[solver]()


class Cell(torch.nn.Module):
    """A contractive cell of ``nn.Linear`` layers, whose output autocast leaves in bfloat16
    (the case the DEQ must cast back): a tensor state (B, 6) or a tuple ((B, 2, 3), (B, 4))."""

    def __init__(self, tuple_state: bool) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def lin(n_in: int, n_out: int, scale: float) -> torch.nn.Linear:
            layer = torch.nn.Linear(n_in, n_out)
            w = torch.randn(n_out, n_in, generator=gen)
            with torch.no_grad():
                layer.weight.copy_(scale * w / torch.linalg.matrix_norm(w, 2))
                layer.bias.copy_(0.1 * torch.randn(n_out, generator=gen))
            return layer

        self.tuple_state = tuple_state
        self.W, self.U = lin(6, 6, 0.6), lin(3, 6, 1.0)
        if tuple_state:
            self.P, self.W2, self.Q = lin(4, 6, 0.3), lin(4, 4, 0.6), lin(6, 4, 0.3)

    def forward(self, z, x):
        if not self.tuple_state:
            return torch.tanh(self.W(z) + self.U(x))
        a, c = z
        af = a.flatten(1)
        na = torch.tanh(self.W(af) + self.P(c) + self.U(x))
        return (na.reshape(a.shape), torch.tanh(self.W2(c) + self.Q(af)))


def _problem(tuple_state: bool, device: str = "cpu"):
    cell = Cell(tuple_state).to(device)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)).to(device)
    z0 = (torch.zeros(4, 2, 3), torch.zeros(4, 4)) if tuple_state else torch.zeros(4, 6)
    z0 = tuple(t.to(device) for t in z0) if tuple_state else z0.to(device)
    return cell, x, z0


def _gradients(deq, cell, x, z0, *, amp: bool, dtype: torch.dtype = BF16):
    deq.zero_grad()
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype, enabled=amp):
        z, info = deq(z0, x)
        loss = inner(z, state_target(z))
    loss.backward()
    params = [p.grad.clone() for p in cell.parameters()]
    return z, info, params, x.grad


@pytest.mark.parametrize(("solver", "grad"), CASES, ids=[f"{s}-{e}" for s, e in CASES])
def test_every_solver_and_estimator_runs_under_the_callers_autocast(solver, grad, tuple_state):
    cell, x, z0 = _problem(tuple_state)
    deq = pdq.DEQ(cell, solver=_solver(solver, grad), grad=ESTIMATORS[grad]())
    z32, _, p32, x32 = _gradients(deq, cell, x, z0, amp=False)
    z, info, params, xg = _gradients(deq, cell, x, z0, amp=True)
    parts = z if isinstance(z, tuple) else (z,)
    assert all(t.dtype == torch.float32 for t in parts)  # the state keeps z0's dtype
    assert info.residual.dtype == torch.float32
    assert info.result != "nonfinite"
    assert all(torch.isfinite(g).all() for g in [*params, xg])
    # close to the float32 gradient: a bf16 cell changes it by a few parts in a thousand
    assert cosine_similarity(params, p32) > 0.99
    assert cosine_similarity(xg, x32) > 0.99
    # and it is a different computation: f ran in bfloat16
    assert not all(torch.equal(a, b) for a, b in zip(params, p32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("grad", ESTIMATORS)
def test_every_estimator_under_a_cuda_autocast(grad, dtype):
    cell, x, z0 = _problem(False, "cuda")
    deq = pdq.DEQ(cell, solver=_solver(NEEDS.get(grad, "anderson"), grad), grad=ESTIMATORS[grad]())
    _, _, p32, x32 = _gradients(deq, cell, x, z0, amp=False)
    z, _, params, xg = _gradients(deq, cell, x, z0, amp=True, dtype=dtype)
    assert z.dtype == torch.float32
    assert all(torch.isfinite(g).all() for g in [*params, xg])
    assert cosine_similarity(params, p32) > 0.99
    assert cosine_similarity(xg, x32) > 0.99


def test_f_runs_under_the_autocast_and_the_solver_outside_it():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, z, x):
            pre = self.lin(z)
            seen.append((pre.dtype, torch.is_autocast_enabled("cpu")))
            return torch.tanh(0.5 * pre)  # bfloat16 under autocast

    deq = pdq.DEQ(Probe(), solver=pdq.Anderson(max_iter=6, tol=0), grad=pdq.UPG(k=2))
    with torch.autocast("cpu", dtype=BF16):
        z, info = deq(torch.zeros(3, 8), torch.randn(3, 8))
    assert z.dtype == torch.float32 and info.z.dtype == torch.float32
    assert seen and all(s == (BF16, True) for s in seen)


def test_a_plain_function_cell_and_eval_mode_under_autocast():
    w = torch.randn(8, 8) * 0.1

    def f(z, x):
        return torch.tanh((z + x) @ w)  # bfloat16 under autocast

    deq = pdq.DEQ(f, solver=pdq.FixedPoint(max_iter=20, tol=0), grad=pdq.OneStep())
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        z, _ = deq(torch.zeros(3, 8), x)
        assert deq.f(z, x).dtype == BF16  # the cell itself returns bfloat16
        deq.eval()
        z_eval, _ = deq(torch.zeros(3, 8), x)
    assert z.dtype == z_eval.dtype == torch.float32
    z.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert not z_eval.requires_grad


def test_correction_and_a_captured_solve_under_autocast():
    cell, x, z0 = _problem(False)
    deq = pdq.DEQ(
        cell,
        solver=pdq.FixedPoint(max_iter=20, tol=1e-5),
        grad=pdq.UPG(k=3),
        correction=pdq.grad.Correction(states=3),
    )
    with torch.autocast("cpu", dtype=BF16):
        z, info = deq(z0, x)
    assert info.states is not None and len(info.states) == 3
    assert all(s.dtype == torch.float32 for s in info.states)
    graphed = pdq.DEQ(
        cell, solver=pdq.Anderson(max_iter=12, tol=0), grad=pdq.UPG(k=3), cuda_graph=True
    )
    graphed._graphs = GraphedSolves(EagerCapture)
    for _ in range(2):
        with torch.autocast("cpu", dtype=BF16):
            zg, _ = graphed(z0, x)
        assert zg.dtype == torch.float32 and torch.isfinite(zg).all()
    assert len(graphed._graphs) == 1


def test_a_wrong_dtype_outside_autocast_is_still_refused():
    deq = pdq.DEQ(
        lambda z, x: (z + x).double(), solver=pdq.FixedPoint(max_iter=5), grad=pdq.OneStep()
    )
    with pytest.raises(
        ValueError, match=r"f output has dtype torch.float64, expected torch.float32"
    ):
        deq(torch.zeros(2, 3), torch.randn(2, 3))
    # under autocast the cell's output is the autocast's business: cast back to the state's
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=BF16):
        z, _ = deq(torch.zeros(2, 3), torch.randn(2, 3))
    assert z.dtype == torch.float32
