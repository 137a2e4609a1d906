"""torch.compile (inductor, CPU) of a whole DEQ: the compiled module computes what the eager one
computes, a fixed-budget solve is one graph, and a training loop never recompiles.

Compilation costs seconds per graph on two cores, so the cells are tiny float64 maps and each
test compiles one module; everything is skipped, with the reason, where inductor cannot build
(e.g. no C++ compiler).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D
from phantomdeq._state import as_tuple

# slow tier: every test compiles with inductor or dynamo (minutes on 2 cores); inductor's own
# internals call deprecated torch APIs (pytest turns warnings into errors)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:torch.*"),
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf"),
]

# the functions holding a solver loop (or called from inside one)
LOOP_FRAMES = {"_solve", "_solve_residuals", "_solve_pairs", "update", "_weights", "_unroll_loop"}


@functools.cache
def _inductor_problem() -> str | None:
    try:
        fn = torch.compile(lambda t: torch.tanh(t) * 2.0, backend="inductor", fullgraph=True)
        fn(torch.ones(3, dtype=torch.float64))
    except Exception as exc:  # any failure to build means: cannot test here
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


@pytest.fixture(autouse=True)
def inductor():
    problem = _inductor_problem()
    if problem is not None:
        pytest.skip(f"torch.compile with inductor is unusable here: {problem}")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _breaks_in_loop(deq, *args) -> tuple[list[str], int, int]:
    """Graph breaks whose user stack passes through a solver loop; graph and break counts."""
    expl = torch._dynamo.explain(deq)(*args)
    inside = [
        b.reason.splitlines()[0]
        for b in expl.break_reasons
        if any(frame.name in LOOP_FRAMES for frame in b.user_stack)
    ]
    return inside, expl.graph_count, expl.graph_break_count


ESTIMATORS = {
    "upg": (lambda: pdq.UPG(k=3, lam=0.5), lambda n: pdq.Anderson(max_iter=n, tol=0.0, m=3)),
    "npg": (lambda: pdq.NPG(k=3, lam=0.5), lambda n: pdq.FixedPoint(max_iter=n, tol=0.0)),
    "ift": (
        lambda: pdq.IFT(solver=pdq.Broyden(max_iter=20, tol=0.0), warn_unconverged=False),
        lambda n: pdq.Broyden(max_iter=n, tol=0.0),
    ),
    "onestep": (lambda: pdq.OneStep(), lambda n: pdq.FixedPoint(max_iter=n, tol=0.0)),
    "bptt": (lambda: pdq.BPTT(), lambda n: pdq.FixedPoint(max_iter=n, tol=0.0, damping=0.8)),
}


@pytest.mark.parametrize("est", list(ESTIMATORS))
def test_compiled_training_steps_match_eager_without_recompiling(est):
    """Three training steps on new data: the compiled DEQ's solution and the gradients w.r.t. the
    parameters and the input equal the eager DEQ's (float64, to 1e-10 relative); the compiled
    graphs are built by the first step only; the fixed-budget solve loop is never split."""
    make_grad, make_solver = ESTIMATORS[est]
    tuple_state = est in ("upg", "bptt")  # tuple states on two estimators (compile time)
    cell_e, x = make_problem(tuple_state)
    cell_c, _ = make_problem(tuple_state)
    eager = pdq.DEQ(cell_e, solver=make_solver(6), grad=make_grad())
    module = pdq.DEQ(cell_c, solver=make_solver(6), grad=make_grad())
    compiled = torch.compile(module, backend="inductor")
    gen = torch.Generator().manual_seed(5)
    built = None
    for step in range(3):
        xs = x.detach() + 0.3 * torch.randn(x.shape, dtype=x.dtype, generator=gen)
        out = []
        for deq, cell in ((eager, cell_e), (compiled, cell_c)):
            xi = xs.clone().requires_grad_()
            z, info = deq(cell.z0(3), xi)
            grads = torch.autograd.grad(inner(z, state_target(z)), [*cell.parameters(), xi])
            out.append(([t.detach() for t in as_tuple(z)], grads, info))
        (z_e, g_e, i_e), (z_c, g_c, i_c) = out
        assert D.relative_error(z_c, z_e) < 1e-12
        assert D.relative_error(g_c, g_e) < 1e-10
        assert (i_c.niter, i_c.result, i_c.nstep.tolist()) == (
            i_e.niter,
            i_e.result,
            i_e.nstep.tolist(),
        )
        if step == 0:
            built = _graphs()
            assert built > 0
        else:
            assert _graphs() == built, f"step {step} compiled new graphs (recompilation)"
    inside, _, _ = _breaks_in_loop(module, cell_c.z0(3), x.detach().requires_grad_())
    assert inside == []


def test_compiled_eval_solve_is_one_graph_per_budget():
    """Eval mode, no gradient: the whole fixed-budget Broyden solve of 7 evaluations is traced
    into one graph (the cell's 7 evaluations appear in one captured graph), results equal."""
    cell, x = make_problem(False)
    deq = pdq.DEQ(cell, solver=pdq.Broyden(max_iter=7, tol=0.0), grad=pdq.UPG()).eval()
    with torch.no_grad():
        z_e, info_e = deq(cell.z0(3), x)
        compiled = torch.compile(deq, backend="inductor")
        z_c, info_c = compiled(cell.z0(3), x)
    assert D.relative_error([z_c], [z_e]) < 1e-12
    assert info_c.trace == pytest.approx(info_e.trace, rel=1e-10)
    expl = torch._dynamo.explain(deq)(cell.z0(3), x.detach())
    tanh_per_graph = [
        sum(1 for n in gm.graph.nodes if "tanh" in str(n.target)) for gm in expl.graphs
    ]
    assert max(tanh_per_graph) == 7, tanh_per_graph  # every evaluation of f in one graph


def test_convergence_checks_split_the_graph_a_bounded_number_of_times():
    """With tol > 0 the solve stops early: under torch.compile it runs eagerly, one graph break
    per solve whatever max_iter, and it stops where the eager solve stops."""
    counts = []
    for max_iter in (6, 40):
        cell, x = make_problem(True)
        deq = pdq.DEQ(
            cell, solver=pdq.Anderson(max_iter=max_iter, tol=1e-9, check_every=2), grad=pdq.UPG()
        )
        _, graphs, breaks = _breaks_in_loop(deq, cell.z0(3), x.detach().requires_grad_())
        counts.append(breaks)
    assert counts[0] == counts[1] <= 4, counts
    compiled = torch.compile(deq, backend="inductor")
    xi = x.detach().requires_grad_()
    z_c, info_c = compiled(cell.z0(3), xi)
    z_e, info_e = deq(cell.z0(3), xi)
    assert info_c.result == info_e.result == "converged" and max(info_c.niter, info_e.niter) < 40
    # inductor may fuse and reorder the residual's reductions: a residual at the tolerance may
    # then pass one check later (check_every=2 steps); otherwise the same iterates
    assert abs(info_c.niter - info_e.niter) <= 2
    err = D.relative_error([t.detach() for t in z_c], [t.detach() for t in z_e])
    assert err < (1e-12 if info_c.niter == info_e.niter else 1e-7)


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's notes about the cell's modules
def test_train_compile_option_trains_through_the_compiled_model(tmp_path, monkeypatch):
    """``train.compile: true`` runs the model through ``compile_model`` (in place, so the
    checkpoint keys are the eager model's); compiled with dynamo and the eager backend (the
    inductor numerics are the other tests' business) the run's losses equal the eager run's,
    and three more epochs compile no new graph."""
    pytest.importorskip("sklearn")
    pytest.importorskip("yaml")
    import phantomdeq.train.trainer as compile_module  # where the trainer calls compile_model
    from conftest import steps, tiny_config
    from phantomdeq.train import run_training

    real = compile_module.compile_model
    calls = []

    def spy(net, **options):
        calls.append(type(net).__name__)
        return real(net, backend="eager")

    monkeypatch.setattr(compile_module, "compile_model", spy)
    data = {"train_size": 32, "test_size": 16, "batch_size": 16}
    losses, graphs = {}, {}
    for name, compiled, epochs in (("eager", False, 2), ("short", True, 2), ("long", True, 5)):
        torch._dynamo.reset()
        counters.clear()
        raw = tiny_config(
            train={"epochs": epochs, "compile": compiled, "device": "auto"}, data=data
        )
        run_training(raw, tmp_path / name, progress=False)
        losses[name] = [s["train_loss"] for s in steps(tmp_path / name)]
        graphs[name] = _graphs()
    assert calls == ["MDEQ", "MDEQ"]
    assert losses["short"] == losses["eager"] == losses["long"][:4]
    assert graphs["eager"] == 0 and graphs["short"] == graphs["long"] > 0
    state = torch.load(tmp_path / "short" / "last.pt", weights_only=False)
    assert (
        state["model"].keys()
        == torch.load(tmp_path / "eager" / "last.pt", weights_only=False)["model"].keys()
    )


class _ConvCell(torch.nn.Module):
    """Two 3x3 convolutions, a contraction in z (float64)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.c1 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
        with torch.no_grad():
            self.c1.weight.mul_(0.3)
            self.c2.weight.mul_(0.3)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.c2(torch.relu(self.c1(z))) + x)


def _weight_grad_convs(run) -> int:
    """How many convolution backward calls of ``run()`` compute a weight gradient."""
    with torch.profiler.profile(record_shapes=True) as prof:
        run()
    return sum(
        1
        for e in prof.events()
        if e.name == "aten::convolution_backward" and list(e.concrete_inputs[-1])[1]
    )


def test_compiled_ift_backward_solve_costs_what_eager_costs():
    """IFT with a 6-iteration FixedPoint backward on a conv cell, three training steps: the
    compiled DEQ's parameter and input gradients equal the eager ones, the first step builds at
    most 8 graphs and the later steps none, and the backward solve's vector-Jacobian products
    compute no weight gradient (as in eager mode: 2 weight-gradient convolutions per step, those
    of the final product through y = f(z*)) -- compiled into the graph of y, each product would
    compute the gradients of all of y's inputs."""
    cell_e, cell_c = _ConvCell(), _ConvCell()

    def deq(cell):
        grad = pdq.IFT(solver=pdq.FixedPoint(max_iter=6, tol=0.0), warn_unconverged=False)
        return pdq.DEQ(cell, solver=pdq.Anderson(max_iter=6, tol=0.0, m=3), grad=grad)

    eager, compiled = deq(cell_e), torch.compile(deq(cell_c), backend="inductor")
    gen = torch.Generator().manual_seed(7)

    def step(module, cell, x):
        xi = x.clone().requires_grad_()
        z, _ = module(torch.zeros_like(x), xi)
        return torch.autograd.grad(z.square().sum(), [*cell.parameters(), xi])

    built = None
    for i in range(3):
        x = 0.5 * torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen)
        g_e, g_c = step(eager, cell_e, x), step(compiled, cell_c, x)
        assert D.relative_error(list(g_c), list(g_e)) < 1e-10
        if i == 0:
            built = _graphs()
            assert 0 < built <= 8, built
        else:
            assert _graphs() == built, f"step {i} compiled new graphs (recompilation)"
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen)
    counts = [
        _weight_grad_convs(lambda m=m, c=c: step(m, c, x))
        for m, c in ((eager, cell_e), (compiled, cell_c))
    ]
    assert counts[1] == counts[0] == 2, counts
