"""DEQ(cuda_graph=True) on CPU, up to the capture call: fixed-budget solves read nothing on the
host (the condition for capture), a captured solve is replayed with the eager result, new data
reuses the capture, and a cell that replaces its tensors is captured again. The capture itself
(torch.cuda.CUDAGraph) is tested in tests/test_cuda.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq._state import StateSpec, as_tuple
from phantomdeq.solvers.graphed import EagerCapture, GraphedSolves, NoHostSync

SOLVERS = {
    "fixed_point": lambda **kw: pdq.FixedPoint(**kw),
    "anderson": lambda **kw: pdq.Anderson(m=3, **kw),
    "broyden": lambda **kw: pdq.Broyden(**kw),
    "broyden_memory": lambda **kw: pdq.Broyden(memory=2, **kw),
}


def _graphed(deq: pdq.DEQ) -> pdq.DEQ:
    deq._graphs = GraphedSolves(EagerCapture)
    return deq


@pytest.mark.parametrize("name", SOLVERS)
def test_a_fixed_budget_solve_reads_nothing_on_the_host(name, tuple_state):
    """What a CUDA graph needs: with tol=0 and no host reads allowed (sync_free), the whole loop
    runs under a mode that refuses every host read; the eager CPU path (best iterate kept by
    reference after a host read) is refused by the same mode, so the check is real."""
    cell, x = make_problem(tuple_state)
    z0 = cell.z0(3)
    spec = StateSpec.of(z0)
    solver = SOLVERS[name](max_iter=7, tol=0.0)

    def g(z):
        return cell(z, x.detach())

    with NoHostSync():
        tracker = solver._iterate(g, z0, spec, sync_free=True)
        tracker.outcome()
    assert tracker.niter == 7
    with pytest.raises(RuntimeError, match="host synchronisation"), NoHostSync():
        solver._iterate(g, z0, spec, sync_free=False)


@pytest.mark.parametrize("name", SOLVERS)
def test_replayed_solve_equals_the_eager_solve(name, tuple_state):
    """Three steps on new inputs: the replayed solve gives the eager solution, statistics and
    gradients exactly (CPU replay runs the same kernels), and the solve is captured once."""
    cell, x = make_problem(tuple_state)
    eager = pdq.DEQ(cell, solver=SOLVERS[name](max_iter=8, tol=0.0), grad=pdq.UPG(k=3))
    graphed = _graphed(
        pdq.DEQ(cell, solver=SOLVERS[name](max_iter=8, tol=0.0), grad=pdq.UPG(k=3), cuda_graph=True)
    )
    before = EagerCapture.captures
    for step in range(3):
        xs = (x + 0.5 * step).detach().requires_grad_()
        got = []
        for deq in (eager, graphed):
            z, info = deq(cell.z0(3), xs)
            grads = torch.autograd.grad(inner(z, state_target(z)), [*cell.parameters(), xs])
            got.append((z, info, grads))
        (z_e, i_e, g_e), (z_g, i_g, g_g) = got
        for a, b in zip(as_tuple(z_e), as_tuple(z_g)):
            assert torch.equal(a, b)
        for a, b in zip(g_e, g_g):
            assert torch.equal(a, b)
        assert i_g.trace == i_e.trace and i_g.niter == i_e.niter == 8
        assert torch.equal(i_g.nstep, i_e.nstep) and i_g.result == i_e.result
        assert torch.equal(i_g.abs_residual, i_e.abs_residual)
    assert EagerCapture.captures - before == 1
    assert len(graphed._graphs) == 1


def test_the_solution_does_not_alias_the_graphs_memory():
    """The next replay overwrites the graph's static outputs; a returned Solution keeps its
    values."""
    cell, x = make_problem(False)
    deq = _graphed(
        pdq.DEQ(cell, solver=pdq.Anderson(max_iter=6, tol=0.0), grad=pdq.UPG(), cuda_graph=True)
    )
    with torch.no_grad():
        z1, info1 = deq(cell.z0(3), x)
        keep = (z1.clone(), info1.residual.clone(), info1.nstep.clone())
        deq(cell.z0(3), x + 1.0)
    assert torch.equal(z1, keep[0]) and torch.equal(info1.residual, keep[1])
    assert torch.equal(info1.nstep, keep[2])


class _ReplacingCell(torch.nn.Module):
    """Holds a tensor attribute it replaces on ``renew()`` (like a dropout mask resampled into a
    new tensor for each solve) and a buffer it can replace."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()
        self.scale = torch.full((4,), 0.5, dtype=torch.float64)
        self.register_buffer("shift", torch.zeros(4, dtype=torch.float64))

    def renew(self, value: float) -> None:
        self.scale = torch.full((4,), value, dtype=torch.float64)

    def forward(self, z, x):
        return torch.tanh(self.scale * self.lin(z) + x + self.shift)


def test_replaced_tensor_attributes_are_inputs_and_replaced_buffers_a_new_capture():
    """A tensor attribute assigned anew (a dropout mask) is copied into the graph's static
    copy before each replay: no new capture, the result follows the new value. A replaced
    buffer (the graph would read the old one) is captured again, with a warning."""
    cell = _ReplacingCell()
    x = torch.randn(2, 4, dtype=torch.float64)
    z0 = torch.zeros(2, 4, dtype=torch.float64)
    deq = _graphed(
        pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=5, tol=0.0), grad=pdq.UPG(), cuda_graph=True)
    )
    ref = pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=5, tol=0.0), grad=pdq.UPG())
    with torch.no_grad():
        deq(z0, x)
        before = EagerCapture.captures
        cell.renew(0.9)
        z, _ = deq(z0, x)
        assert EagerCapture.captures == before
        assert torch.equal(z, ref(z0, x)[0])
        assert torch.equal(cell.scale, torch.full((4,), 0.9, dtype=torch.float64))
        cell.shift = torch.full((4,), 0.1, dtype=torch.float64)  # a new buffer tensor
        with pytest.warns(RuntimeWarning, match=r"buffer\(s\) \['shift'\] of f were replaced"):
            z, _ = deq(z0, x)
        assert EagerCapture.captures == before + 1
        assert torch.equal(z, ref(z0, x)[0])


def test_cuda_graph_option_refuses_what_it_cannot_capture():
    cell, _ = make_problem(False)
    with pytest.raises(ValueError, match=r"cuda_graph=True needs solver .* fixed budget \(tol=0"):
        pdq.DEQ(cell, solver=pdq.Anderson(tol=1e-4), grad=pdq.UPG(), cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs eval_solver"):
        pdq.DEQ(
            cell,
            solver=pdq.Anderson(tol=0.0),
            eval_solver=pdq.Anderson(tol=1e-3),
            grad=pdq.UPG(),
            cuda_graph=True,
        )
    with pytest.raises(ValueError, match="BPTT"):
        pdq.DEQ(cell, solver=pdq.FixedPoint(tol=0.0), grad=pdq.BPTT(), cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph"):
        pdq.DEQ(cell, solver=pdq.FixedPoint(tol=0.0), grad=pdq.UPG(), cuda_graph=1)
    deq = pdq.DEQ(cell, solver=pdq.FixedPoint(tol=0.0), grad=pdq.UPG(), cuda_graph=True)
    with pytest.raises(ValueError, match="fixed budget"), deq.using(solver=pdq.FixedPoint()):
        pass


def test_without_cuda_the_default_backend_runs_eagerly_and_pickles_without_graphs():
    cell, x = make_problem(False)
    deq = pdq.DEQ(cell, solver=pdq.Anderson(max_iter=6, tol=0.0), grad=pdq.UPG(), cuda_graph=True)
    ref = pdq.DEQ(cell, solver=pdq.Anderson(max_iter=6, tol=0.0), grad=pdq.UPG())
    with torch.no_grad():
        z, _ = deq(cell.z0(3), x)
        z_ref, _ = ref(cell.z0(3), x)
    assert torch.equal(z, z_ref) and len(deq._graphs) == 0  # CPU tensors: nothing captured
    graphed = _graphed(deq)
    with torch.no_grad():
        graphed(cell.z0(3), x)
    assert len(graphed._graphs) == 1
    for clone in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert len(clone._graphs) == 0 and clone._graphs.backend is EagerCapture


# ---------------------------------------------------------------------- reused buffers


@pytest.mark.parametrize("name", ["anderson", "broyden", "broyden_memory"])
def test_history_buffers_are_reused_and_never_returned(name):
    """On CPU the history buffers survive between solves (no fresh multi-MB allocation); a
    returned solution never lives in them; pickling and deep copies drop them."""
    cell, x = make_problem(False)
    solver = SOLVERS[name](max_iter=9, tol=0.0)

    def g(z):
        return cell(z, x.detach())

    first = solver(g, cell.z0(3))
    kept = first.z.clone()
    ptrs = {k: v.data_ptr() for k, v in solver._workspace.items()}
    assert ptrs
    second = solver(g, cell.z0(3) + 0.3)
    assert {k: v.data_ptr() for k, v in solver._workspace.items()} == ptrs
    assert torch.equal(first.z, kept)
    assert not torch.equal(second.z, first.z)
    for clone in (copy.deepcopy(solver), pickle.loads(pickle.dumps(solver))):
        assert clone._workspace == {}
        assert torch.equal(clone(g, cell.z0(3)).z, kept)


def test_a_nested_solve_with_the_same_solver_gets_its_own_buffers():
    """A cell that itself solves with the same solver instance (a DEQ inside a DEQ's cell):
    the inner solve must not overwrite the outer solve's history (the outer solve, cut after 6
    evaluations, equals one whose cell uses a separate solver instance)."""
    gen = torch.Generator().manual_seed(0)
    w = 0.3 * torch.randn(5, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(5, 5, dtype=torch.float64, generator=gen)
    b = 0.95 * b / torch.linalg.matrix_norm(b, 2)
    c = torch.randn(2, 5, dtype=torch.float64, generator=gen)

    def outer(inner_solver):
        def g(z):
            u = inner_solver(lambda u: torch.tanh(u @ w.T + z), torch.zeros_like(z)).z
            return torch.tanh(z @ b.T + 0.5 * u + c)

        return g

    shared = pdq.Anderson(max_iter=6, tol=0.0, m=3)
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    got = shared(outer(shared), z0)
    want = pdq.Anderson(max_iter=6, tol=0.0, m=3)(outer(pdq.Anderson(max_iter=6, tol=0.0, m=3)), z0)
    assert min(want.trace) > 1e-3  # far from converged: the history matters
    assert torch.equal(got.z, want.z)


# ---------------------------------------------------------------------- IFT backward


class _RecordCotangent(torch.autograd.Function):
    seen: list[bool] = []

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        _RecordCotangent.seen.append(grad.is_contiguous())
        return grad


def test_ift_backward_hands_contiguous_cotangents_to_autograd(tuple_state):
    """Every vector-Jacobian product of the IFT backward solve, and the final pass through
    y = F(h*), receives contiguous cotangents per state part (views of the flat iterate were
    strided, and every convolution backward copied them)."""
    cell, x = make_problem(tuple_state)

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, z, x):
            out = self.cell(z, x)
            if isinstance(out, tuple):
                return tuple(_RecordCotangent.apply(t) for t in out)
            return _RecordCotangent.apply(out)

    deq = pdq.DEQ(
        Recording(),
        solver=pdq.Anderson(max_iter=40, tol=1e-10),
        grad=pdq.IFT(solver=pdq.FixedPoint(max_iter=5, tol=0.0), warn_unconverged=False),
    )
    z, _ = deq(cell.z0(3), x)
    _RecordCotangent.seen = []
    torch.autograd.grad(inner(z, state_target(z)), list(cell.parameters()))
    assert len(_RecordCotangent.seen) >= 5 * (2 if tuple_state else 1)
    assert all(_RecordCotangent.seen)
