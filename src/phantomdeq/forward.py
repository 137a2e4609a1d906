"""One forward pass of a :class:`~phantomdeq.DEQ` as its gradient estimator sees it.

The DEQ builds a :class:`ForwardPass` per call and hands it to the estimator's
:meth:`~phantomdeq.grad.GradientEstimator.equilibrium`, which runs the solve the estimator needs
(:meth:`ForwardPass.solve`, or its own use of :attr:`ForwardPass.solver`) and attaches its
gradient (:meth:`ForwardPass.attach`). The pass owns what every estimator shares: the solve
without a graph with ``f``'s parametrizations computed once, the replay of a captured solve,
and the non-finite policy -- a sample whose solve hit inf/NaN is reported (raise or warn) and,
when warned, cut off from the gradient (:class:`Cutoff`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._state import State, StateSpec, detach, tree_map
from .errors import DEQError
from .solvers.base import Solution, Solver, SolverBase, SolveResult, sync_free
from .solvers.graphed import GraphedSolves

#: what a DEQ does when a sample's solve hits inf/NaN (``DEQ(on_nonfinite=...)``)
NONFINITE_MODES = ("raise", "warn")

# a non-finite warning names the first frame outside torch and the DEQ's own code
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SKIP = (
    os.path.dirname(torch.__file__) + os.sep,
    _HERE + "forward.py",
    _HERE + "deq.py",
    _HERE + "grad" + os.sep,
)


class AttachFn(Protocol):
    """:meth:`~phantomdeq.grad.GradientEstimator.attach`'s signature."""

    def __call__(
        self,
        f: Callable[..., Any],
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State: ...


class ForwardPass:
    """The cell ``f`` (already under the caller's autocast, see
    :func:`~phantomdeq.precision.under_autocast`), its ``inputs``, the initial state ``z0``
    (structure ``spec``) and the forward ``solver`` of one DEQ call.

    ``graphs``: the DEQ's captured solves when this solve may be replayed from a CUDA graph
    (``DEQ(cuda_graph=True)``), else None. :attr:`record`: a map that :meth:`solve` calls in
    place of ``f`` (fixed-point correction records states through it), None by default.
    After :meth:`check` found non-finite samples (and ``on_nonfinite="warn"``),
    :attr:`cutoff` describes how they are held out of the gradient, and :attr:`cell`,
    :attr:`grad_inputs` are the cell and inputs a gradient must then be attached with.
    """

    def __init__(
        self,
        f: Callable[..., Any],
        inputs: Sequence[Any],
        z0: State,
        spec: StateSpec,
        solver: Solver,
        *,
        on_nonfinite: str = "raise",
        graphs: GraphedSolves | None = None,
    ) -> None:
        self.f = f
        self.inputs = tuple(inputs)
        self.z0 = z0
        self.spec = spec
        self.solver = solver
        self.on_nonfinite = on_nonfinite
        self.graphs = graphs
        self.record: Callable[[State], Any] | None = None
        self.cutoff: Cutoff | None = None

    def g(self, z: State) -> Any:
        """``f(z, *inputs)``: the map whose fixed point is solved."""
        return self.f(z, *self.inputs)

    @property
    def cell(self) -> Callable[..., Any]:
        """The cell a gradient is attached with: ``f``, or ``f`` with the non-finite samples held
        still (:class:`HeldCell`)."""
        return self.f if self.cutoff is None else self.cutoff.cell

    @property
    def grad_inputs(self) -> tuple[Any, ...]:
        """The inputs a gradient is attached with: the non-finite samples' rows zeroed."""
        return self.inputs if self.cutoff is None else self.cutoff.inputs

    def held(self, z: State) -> State:
        """``z`` with the non-finite samples replaced by their frozen iterate and inf/NaN
        zeroed (``z`` unchanged when there are none)."""
        return z if self.cutoff is None else self.cutoff.hold(z)

    def solve(
        self, method: Callable[[Callable[[State], Any], State], Solution] | None = None
    ) -> Solution:
        """The forward solve without a graph, then :meth:`check`. ``method(g, z0)``: the
        solver's method to call (e.g. ``solver.solve_with_inverse``); None (default): the solver
        itself, on :attr:`record` when set, replayed from a captured graph where ``graphs``
        allows. The weights hold still during the solve: each parametrization of ``f`` is
        computed once (not while ``torch.compile`` traces: a context manager around the solve
        would split the compiled graph, and the traced parametrizations give the same weight
        at each call)."""
        z0 = detach(self.z0)
        g = self.g if method is not None or self.record is None else self.record
        run = self.solver if method is None else method
        if sync_free() or getattr(parametrize, "_cache_enabled", False):
            sol = run(g, z0)
        elif method is None and self.graphs is not None and isinstance(self.solver, SolverBase):
            with parametrize.cached():
                sol = self.graphs(self.solver, self.f, z0, self.inputs)
        else:
            with parametrize.cached():
                sol = run(g, z0)
        self.check(sol, "forward")
        return sol

    def attach(self, attach: AttachFn, sol: Solution) -> State:
        """``attach(cell, z*, inputs, spec, info=sol)``: the solution with an estimator's
        gradient; the non-finite samples, if any, held at their frozen iterate and cut off."""
        start = sol.z if self.cutoff is None else self.cutoff.frozen
        return attach(self.cell, start, self.grad_inputs, self.spec, info=sol)

    @torch.compiler.disable
    def check(self, sol: Solution, what: str) -> Tensor | None:
        """None when every sample is finite; else raise :class:`~phantomdeq.DEQError`
        (``on_nonfinite="raise"``) or warn, set :attr:`cutoff` and return the mask. Not traced
        by ``torch.compile`` (it reads the solve's outcome on the host)."""
        if sol.result != SolveResult.NONFINITE:
            return None
        spec = self.spec
        bad = sol.nonfinite
        if bad is None or bad.shape != (spec.batch,):
            raise DEQError(
                f"DEQ {what} solve reported non-finite values without a per-sample mask",
                solution=sol,
            )
        idx = bad.nonzero().flatten().tolist()
        shown = ", ".join(str(i) for i in idx[:20]) + (", ..." if len(idx) > 20 else "")
        n_ok = int((sol.converged & ~bad).sum())
        msg = (
            f"DEQ {what} solve hit non-finite values in {len(idx)} of {spec.batch} samples "
            f"(indices [{shown}]); the other {spec.batch - len(idx)} kept iterating: {n_ok} "
            f"converged after {sol.niter} iterations (tol {sol.tol:g}, stop {sol.stop!r})"
        )
        if self.on_nonfinite == "raise":
            raise DEQError(msg + "; the error's .solution holds the solve", solution=sol)
        warnings.warn(
            msg + "; returning their best finite iterates, cut off from the gradient",
            RuntimeWarning,
            stacklevel=_caller_level(),
        )
        self.cutoff = Cutoff(self.f, self.inputs, bad, sol.z, spec.batch)
        return bad


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside torch and the DEQ's own code, as seen from
    the function that calls this one."""
    frame = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


class Cutoff:
    """The samples ``bad`` of a batch, held out of the gradient: the gradient pass runs
    :attr:`cell` (``f`` with those samples held at :attr:`frozen`, their finite best iterate)
    on :attr:`inputs` (their rows of every floating batch input zeroed), so no NaN reaches a
    parameter gradient through them."""

    def __init__(self, f: Any, inputs: Sequence[Any], bad: Tensor, z: State, batch: int) -> None:
        self.bad = bad
        self.frozen = finite(z)
        self.cell = HeldCell(f, bad, self.frozen)
        self.inputs = cut_inputs(inputs, bad, batch)

    def hold(self, z: State) -> State:
        """``z`` with inf/NaN zeroed and the rows ``bad`` replaced by :attr:`frozen` (a
        constant)."""
        return hold(finite(z), self.bad, self.frozen)


class HeldCell(nn.Module):
    """``f`` with the samples in ``bad`` held at ``frozen``: the gradient pass of a batch with
    non-finite samples differentiates only through the healthy ones."""

    def __init__(self, f: Any, bad: Tensor, frozen: State) -> None:
        super().__init__()
        self.f = f
        self.bad = bad
        self.frozen = frozen

    def forward(self, z: State, *inputs: Any) -> Any:
        return hold(self.f(z, *inputs), self.bad, self.frozen)


def hold(out: Any, bad: Tensor, frozen: State) -> Any:
    """``out`` with the rows ``bad`` replaced by ``frozen``'s (a constant: zero gradient)."""
    if isinstance(out, Tensor) != isinstance(frozen, Tensor):
        return out  # wrong structure: the DEQ's output check names it

    def held(o: Tensor, fr: Tensor) -> Tensor:
        return torch.where(bad.view(-1, *([1] * (o.dim() - 1))), fr.to(o.dtype), o)

    return tree_map(held, out, frozen)


def finite(z: State) -> State:
    """``z`` with inf/NaN entries replaced by zeros."""
    return tree_map(lambda t: torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), z)


def cut_inputs(inputs: Sequence[Any], bad: Tensor, batch: int) -> tuple[Any, ...]:
    """Zero the rows ``bad`` of every floating tensor (in tuples/lists too) with leading size
    ``batch``; their gradient is zero, not NaN."""

    def cut(v: Any) -> Any:
        if isinstance(v, Tensor):
            if v.is_floating_point() and v.dim() >= 1 and v.shape[0] == batch:
                mask = bad.view(-1, *([1] * (v.dim() - 1)))
                return torch.where(mask, torch.zeros((), dtype=v.dtype, device=v.device), v)
            return v
        if isinstance(v, tuple):
            return tuple(cut(u) for u in v)
        if isinstance(v, list):
            return [cut(u) for u in v]
        return v

    return tuple(cut(v) for v in inputs)
