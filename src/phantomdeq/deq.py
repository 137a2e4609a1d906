"""The DEQ layer: solve ``z* = f(z*, *inputs)`` without a graph, then attach a gradient."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._state import State, StateSpec, detach, tree_map
from ._validate import check_bool, check_choice
from .errors import DEQError
from .grad.base import GradientEstimator
from .grad.correction import Correction, StateRecorder, state_estimator
from .nn.norms import update_norms
from .solvers.base import (
    InverseSolver,
    Solution,
    Solver,
    SolverBase,
    SolveResult,
    UnrollingSolver,
    check_solver,
    sync_free,
)
from .solvers.graphed import GraphedSolves

NONFINITE_MODES = ("raise", "warn")

_KEEP: Any = object()


class DEQ(nn.Module):
    """Deep equilibrium layer around a cell ``f(z, *inputs) -> z``.

    ``forward(z0, *inputs)`` returns ``(z, info)``. The forward ``solver`` (or ``eval_solver`` in
    eval mode, when given) solves the fixed point without recording a graph; ``info`` is its
    :class:`~phantomdeq.Solution`. A solver is any object with ``__call__(g, z0) -> Solution``
    (the :class:`~phantomdeq.solvers.Solver` protocol); ``grad=BPTT()`` needs one that can also
    ``unroll(g, z0)`` (``FixedPoint``).

    Gradients. In ``train()`` mode with gradients enabled, ``z`` carries the gradient chosen by
    ``grad`` to ``f``'s parameters and to every input that requires grad: ``F(z*)`` for
    IFT/NPG/OneStep, the unrolled ``h_k`` for UPG, the (best) iterate of the recorded forward
    iteration for BPTT. In ``eval()`` mode ``z`` is the solver's (best) solution without a
    graph — unless ``grad_in_eval=True``, which attaches the same estimator in eval mode too
    (with the eval solver for the forward solve), e.g. for saliency maps or adversarial
    evaluation of a trained model. Under ``torch.no_grad()`` nothing is attached.

    Weight norms. In training mode every :class:`~phantomdeq.nn.SpectralNorm` inside ``f``
    advances its power iteration once per forward pass, before the solve
    (:func:`~phantomdeq.nn.update_norms`); the solve, the gradient's unroll and the backward
    pass all see that one weight.

    Non-finite values. A sample whose iterate turns inf/NaN is frozen at its best finite iterate
    and marked in ``info.nonfinite`` while the rest of the batch keeps iterating. With
    ``on_nonfinite="raise"`` (default) :class:`DEQError` is raised, naming the samples; with
    ``"warn"`` a warning is emitted and the healthy samples' solutions are returned, with their
    gradients. The marked samples are returned at their frozen iterate and cut off from the
    gradient: their state is held constant and the rows of every floating-point tensor input
    whose leading dimension is the batch size are replaced by zeros for the gradient pass, so
    no NaN reaches a parameter gradient through them (for cells that treat samples
    independently, the parameter gradient is that of the healthy samples alone).

    Fixed-point correction (``correction=Correction(states=N, gamma=γ)``, N > 1; Bai et al.,
    CVPR 2022): when a gradient is attached, the solve also records ``N − 1`` states along its
    trajectory (:class:`~phantomdeq.grad.Correction`) and ``info.states`` lists them, each with
    the unrolled phantom gradient ``UPG(k, λ)`` of ``grad`` from that state, followed by the
    returned ``z``; ``info.state_weights`` are their loss weights ``[γ^{N−1}, …, γ, 1]``
    (with ``N = 1``: ``[z]`` and ``[1.0]``, the plain estimator).
    Minimise ``Σ_m w_m L(s_m)`` (:func:`~phantomdeq.grad.corrected_loss`). Needs ``grad`` =
    UPG or NPG and a solver with ``max_iter``; not with ``cuda_graph=True`` (a replayed graph
    records nothing).
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        solver: Solver,
        grad: GradientEstimator,
        eval_solver: Solver | None = None,
        on_nonfinite: str = "raise",
        grad_in_eval: bool = False,
        cuda_graph: bool = False,
        correction: Correction | None = None,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"DEQ: f must be callable (an nn.Module), got {type(f).__name__}")
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_MODES, owner="DEQ")
        self.grad_in_eval = check_bool("grad_in_eval", grad_in_eval, owner="DEQ")
        self.cuda_graph = check_bool("cuda_graph", cuda_graph, owner="DEQ")
        if correction is not None and not isinstance(correction, Correction):
            raise TypeError(
                f"DEQ: correction must be None or a phantomdeq.grad.Correction, got "
                f"{type(correction).__name__} {correction!r}"
            )
        self.correction = correction
        self._graphs = GraphedSolves()
        self.f = f
        self.solver, self.eval_solver, self.grad = self._validated(solver, eval_solver, grad)

    def with_cell(self, f: nn.Module) -> DEQ:
        """A DEQ around ``f`` with this one's configuration (solvers, estimator, options, mode)
        that shares its captured solves, e.g. ``f`` wrapped in :class:`AutocastCell`."""
        deq = DEQ(
            f,
            solver=self.solver,
            grad=self.grad,
            eval_solver=self.eval_solver,
            on_nonfinite=self.on_nonfinite,
            grad_in_eval=self.grad_in_eval,
            cuda_graph=self.cuda_graph,
            correction=self.correction,
        ).train(self.training)
        deq._graphs = self._graphs  # captured solves outlive the wrapper
        return deq

    def __getstate__(self) -> dict[str, Any]:
        # captured CUDA graphs are a cache: never pickled or deep-copied
        state = dict(self.__dict__)
        state["_graphs"] = GraphedSolves(self._graphs.backend)
        return state

    def _validated(
        self, solver: object, eval_solver: object, grad: object
    ) -> tuple[Solver, Solver | None, GradientEstimator]:
        if not isinstance(grad, GradientEstimator):
            raise TypeError(
                "DEQ: grad must be a phantomdeq.grad estimator (IFT, UPG, NPG, OneStep, BPTT), "
                f"got {type(grad).__name__} {grad!r}"
            )
        solver = check_solver(solver, "solver", owner="DEQ")
        if eval_solver is not None:
            eval_solver = check_solver(eval_solver, "eval_solver", owner="DEQ")
        if grad.tracks_forward:
            needed = [("solver", solver)]
            if self.grad_in_eval and eval_solver is not None:
                needed.append(("eval_solver", eval_solver))
            for name, s in needed:
                if not isinstance(s, UnrollingSolver):
                    raise TypeError(
                        f"DEQ: grad=BPTT() back-propagates through the forward iterations and "
                        f"needs {name}=FixedPoint(...) (a solver with an unroll(g, z0) method), "
                        f"got {type(s).__name__}"
                    )
        if self.correction is not None and self.correction.active:
            state_estimator(grad)  # UPG or NPG
            if self.cuda_graph:
                raise ValueError(
                    "DEQ: correction records states inside the solve, which cuda_graph=True "
                    "replays from a captured graph; use cuda_graph=False"
                )
            for name, chosen in (("solver", solver), ("eval_solver", eval_solver)):
                budget = getattr(chosen, "max_iter", None)
                if chosen is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
                    raise TypeError(
                        f"DEQ: correction spaces its states over the {name}'s budget and needs "
                        f"a solver with an integer max_iter, got {chosen!r}"
                    )
        if grad.needs_forward_inverse:
            needed = [("solver", solver)]
            if self.grad_in_eval and eval_solver is not None:
                needed.append(("eval_solver", eval_solver))
            for name, s in needed:
                if not isinstance(s, InverseSolver):
                    raise TypeError(
                        f"DEQ: grad={type(grad).__name__}() reuses the forward solve's "
                        f"inverse-Jacobian estimate and needs {name}=Broyden(...) (a solver "
                        f"with a solve_with_inverse(g, z0) method), got {s!r}"
                    )
        if self.cuda_graph:
            if grad.needs_forward_inverse:
                raise ValueError(
                    f"DEQ: cuda_graph=True replays the forward solve from a CUDA graph, which "
                    f"does not return Broyden's inverse estimate that grad="
                    f"{type(grad).__name__}() needs; use cuda_graph=False"
                )
            if grad.tracks_forward:
                raise ValueError(
                    "DEQ: cuda_graph=True replays the forward solve from a CUDA graph, which "
                    "grad=BPTT() cannot back-propagate through; use cuda_graph=False"
                )
            for name, chosen in (("solver", solver), ("eval_solver", eval_solver)):
                if chosen is not None and not (
                    isinstance(chosen, SolverBase) and chosen.fixed_budget
                ):
                    raise ValueError(
                        f"DEQ: cuda_graph=True needs {name} to be a library solver with a fixed "
                        f"budget (tol=0, e.g. Anderson(max_iter=22, tol=0)): a convergence test "
                        f"reads the device on the host, which a CUDA graph cannot; got {chosen!r}"
                    )
        return solver, eval_solver, grad

    @contextlib.contextmanager
    def using(
        self, *, solver: Any = _KEEP, eval_solver: Any = _KEEP, grad: Any = _KEEP
    ) -> Iterator[DEQ]:
        """Temporarily replace the solver, eval solver and/or gradient estimator (validated as in
        the constructor); the previous ones are restored on exit."""
        saved = (self.solver, self.eval_solver, self.grad)
        new = self._validated(
            saved[0] if solver is _KEEP else solver,
            saved[1] if eval_solver is _KEEP else eval_solver,
            saved[2] if grad is _KEEP else grad,
        )
        self.solver, self.eval_solver, self.grad = new
        try:
            yield self
        finally:
            self.solver, self.eval_solver, self.grad = saved

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, grad={self.grad!r}, eval_solver={self.eval_solver!r}, "
            f"grad_in_eval={self.grad_in_eval}, cuda_graph={self.cuda_graph}"
            + ("" if self.correction is None else f", correction={self.correction!r}")
        )

    def forward(self, z0: State, *inputs: Any) -> tuple[State, Solution]:
        spec = StateSpec.of(z0)
        attach = torch.is_grad_enabled() and (self.training or self.grad_in_eval)
        solver = self.solver if (self.training or self.eval_solver is None) else self.eval_solver
        f = self.f
        if self.training and isinstance(f, nn.Module):
            update_norms(f)

        def g(z: State) -> Any:
            return f(z, *inputs)

        call: Callable[[State], Any] = g
        corr = self.correction
        recorder: StateRecorder | None = None
        if attach and corr is not None and not self.grad.tracks_forward:
            budget = getattr(solver, "max_iter", None)
            if isinstance(budget, bool) or not isinstance(budget, int):  # replaced since
                raise TypeError(f"DEQ: correction needs a solver with max_iter, got {solver!r}")
            recorder = corr.recorder(g, budget)
            call = recorder

        if attach and self.grad.tracks_forward:
            if not isinstance(solver, UnrollingSolver):  # replaced after construction
                raise TypeError(
                    f"DEQ: grad=BPTT() needs a solver with unroll(g, z0), got "
                    f"{type(solver).__name__}"
                )
            z, sol = solver.unroll(call, z0)
            bad = self._check(sol, spec, "forward (BPTT)")
            if bad is not None:
                # rerun with the marked samples held still: the first run's graph holds NaNs
                frozen = _finite(sol.z)
                fm = _Frozen(f, bad, frozen)
                cut = _cut_inputs(inputs, bad, spec.batch)
                start = _hold(z0, bad, frozen)
                z, _ = solver.unroll(lambda s: fm(s, *cut), start)
            return z, sol
        if attach and self.grad.needs_forward_inverse:  # SHINE: Broyden keeps its inverse
            if not isinstance(solver, InverseSolver):  # replaced after construction
                raise TypeError(
                    f"DEQ: grad={type(self.grad).__name__}() needs a solver with "
                    f"solve_with_inverse(g, z0) (Broyden), got {type(solver).__name__}"
                )
            if sync_free() or getattr(parametrize, "_cache_enabled", False):
                sol = solver.solve_with_inverse(g, detach(z0))
            else:
                with parametrize.cached():
                    sol = solver.solve_with_inverse(g, detach(z0))
            bad = self._check(sol, spec, "forward")
            return self._attach(f, sol, inputs, spec, bad), sol
        # the weights hold still during the solve: compute each parametrization once (not
        # while torch.compile traces: a context manager around the solve would split the
        # compiled graph, and the traced parametrizations give the same weight at each call)
        graphed = (
            self.cuda_graph
            and isinstance(solver, SolverBase)
            and self._graphs.supports(spec.device)
            and not sync_free()
        )
        if sync_free() or getattr(parametrize, "_cache_enabled", False):
            sol = solver(call, detach(z0))
        elif graphed:
            with parametrize.cached():
                sol = self._graphs(solver, f, detach(z0), inputs)  # type: ignore[arg-type]
        else:
            with parametrize.cached():
                sol = solver(call, detach(z0))
        bad = self._check(sol, spec, "forward")
        if not attach:
            return sol.z, sol
        return self._attach(f, sol, inputs, spec, bad, recorder), sol

    def _attach(
        self,
        f: Any,
        sol: Solution,
        inputs: Sequence[Any],
        spec: StateSpec,
        bad: Tensor | None,
        recorder: StateRecorder | None = None,
    ) -> State:
        """The solution with the estimator's gradient; samples in ``bad`` cut off from it; with
        fixed-point correction, the recorded states attached too (``sol.states``)."""
        if bad is None:
            z = self.grad.attach(f, sol.z, inputs, spec, info=sol)
            if recorder is not None:
                self._corrected(sol, recorder.states(sol.z), z, f, inputs, spec)
            return z
        frozen = _finite(sol.z)
        cut = _cut_inputs(inputs, bad, spec.batch)
        fm = _Frozen(f, bad, frozen)
        z = self.grad.attach(fm, frozen, cut, spec, info=sol)
        if recorder is not None:
            held = [_hold(_finite(s), bad, frozen) for s in recorder.states(sol.z)]
            self._corrected(sol, held, z, fm, cut, spec)
        return z

    def _corrected(
        self,
        sol: Solution,
        states: list[State],
        z: State,
        f: Any,
        inputs: Sequence[Any],
        spec: StateSpec,
    ) -> None:
        """Fixed-point correction: the recorded states with UPG from each, then ``z``."""
        if self.correction is None:
            return
        attached = []
        if states:
            est = state_estimator(self.grad)
            attached = [est.attach(f, s, inputs, spec) for s in states]
        sol.states = [*attached, z]
        sol.state_weights = self.correction.weights()

    @torch.compiler.disable
    def _check(self, sol: Solution, spec: StateSpec, what: str) -> Tensor | None:
        """None when every sample is finite; else raise or warn and return the mask. Not traced
        by ``torch.compile`` (it reads the solve's outcome on the host)."""
        if sol.result != SolveResult.NONFINITE:
            return None
        bad = sol.nonfinite
        if bad is None or bad.shape != (spec.batch,):
            raise DEQError(
                f"DEQ {what} solve reported non-finite values without a per-sample mask",
                solution=sol,
            )
        idx = bad.nonzero().flatten().tolist()
        shown = ", ".join(str(i) for i in idx[:20]) + (", ..." if len(idx) > 20 else "")
        healthy = ~bad
        n_ok = int((sol.converged & healthy).sum())
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
            stacklevel=3,
        )
        return bad


class _Frozen(nn.Module):
    """``f`` with the samples in ``bad`` held at ``frozen``: the gradient pass of a batch with
    non-finite samples differentiates only through the healthy ones."""

    def __init__(self, f: Any, bad: Tensor, frozen: State) -> None:
        super().__init__()
        self.f = f
        self.bad = bad
        self.frozen = frozen

    def forward(self, z: State, *inputs: Any) -> Any:
        return _hold(self.f(z, *inputs), self.bad, self.frozen)


def _hold(out: Any, bad: Tensor, frozen: State) -> Any:
    """``out`` with the rows ``bad`` replaced by ``frozen``'s (a constant: zero gradient)."""
    if isinstance(out, Tensor) != isinstance(frozen, Tensor):
        return out  # wrong structure: the DEQ's output check names it

    def hold(o: Tensor, fr: Tensor) -> Tensor:
        return torch.where(bad.view(-1, *([1] * (o.dim() - 1))), fr.to(o.dtype), o)

    return tree_map(hold, out, frozen)


def _finite(z: State) -> State:
    return tree_map(lambda t: torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), z)


def _cut_inputs(inputs: Sequence[Any], bad: Tensor, batch: int) -> tuple[Any, ...]:
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
