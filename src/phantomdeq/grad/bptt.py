"""Back-propagation through the forward solver's iterations (reference estimator)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._state import State, StateSpec
from ..solvers.base import Solution, Solver, UnrollingSolver
from .base import Cell, GradientEstimator

if TYPE_CHECKING:
    from ..forward import ForwardPass


class BPTT(GradientEstimator):
    """Back-propagate through every forward iteration (eq. 11 / eq. 14 with T = solver steps).

    The DEQ module runs its forward ``FixedPoint`` solver with autograd recording and returns, per
    sample, the best iterate (the solution in ``info.z``); memory grows linearly with the number
    of iterations. Only differentiable
    solvers qualify: the fixed-point iteration (with any damping).
    """

    name = "bptt"
    tracks_forward = True

    def check_solver(self, solver: Solver, name: str) -> None:
        if not isinstance(solver, UnrollingSolver):
            raise TypeError(
                f"DEQ: grad=BPTT() back-propagates through the forward iterations and "
                f"needs {name}=FixedPoint(...) (a solver with an unroll(g, z0) method), "
                f"got {type(solver).__name__}"
            )

    def check_graphed(self) -> None:
        raise ValueError(
            "DEQ: cuda_graph=True replays the forward solve from a CUDA graph, which "
            "grad=BPTT() cannot back-propagate through; use cuda_graph=False"
        )

    def equilibrium(self, fp: ForwardPass) -> tuple[State, Solution]:
        """The solver's differentiable run (``unroll``) from ``z0``; with non-finite samples
        (``on_nonfinite="warn"``), run again with them held still, since the first run's graph
        holds NaNs."""
        solver = fp.solver
        if not isinstance(solver, UnrollingSolver):  # replaced after construction
            raise TypeError(
                f"DEQ: grad=BPTT() needs a solver with unroll(g, z0), got {type(solver).__name__}"
            )
        z, sol = solver.unroll(fp.g, fp.z0)
        if fp.check(sol, "forward (BPTT)") is not None:
            cell, inputs = fp.cell, fp.grad_inputs
            z, _ = solver.unroll(lambda s: cell(s, *inputs), fp.held(fp.z0))
        return z, sol

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        raise RuntimeError("BPTT is applied by DEQ during the forward solve, not after it")
