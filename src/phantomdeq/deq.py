"""The DEQ layer: solve ``z* = f(z*, *inputs)`` without a graph, then attach a gradient."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._state import State, StateSpec
from ._validate import check_bool, check_choice
from .forward import NONFINITE_MODES, ForwardPass
from .grad.base import GradientEstimator, check_estimator
from .grad.correction import Correction
from .nn.norms import update_norms
from .precision import under_autocast
from .solvers import with_options
from .solvers.base import Solution, Solver, SolverBase, check_solver, sync_free
from .solvers.graphed import GraphedSolves, check_graphable

__all__ = ["DEQ", "NONFINITE_MODES"]

_KEEP: Any = object()


class DEQ(nn.Module):
    """Deep equilibrium layer around a cell ``f(z, *inputs) -> z``.

    ``forward(z0, *inputs)`` returns ``(z, info)``. The forward ``solver`` (or ``eval_solver`` in
    eval mode, when given) solves the fixed point without recording a graph; ``info`` is its
    :class:`~phantomdeq.Solution`. A solver is any object with ``__call__(g, z0) -> Solution``
    (the :class:`~phantomdeq.solvers.Solver` protocol); ``grad=BPTT()`` needs one that can also
    ``unroll(g, z0)`` (``FixedPoint``).

    Per-call solver options (TorchDEQ's ``solver_kwargs``): ``forward(z0, *inputs,
    solver_kwargs={"max_iter": 50})`` solves this call with a copy of the solver in use
    (``solver`` or ``eval_solver``) whose options are replaced
    (:func:`phantomdeq.solvers.with_options`: the keys are checked against the solver class's
    options, a ``ValueError`` naming the unknown ones); the copy is checked as the constructor
    checks a solver, and is never replayed as a captured CUDA graph.

    Gradients. In ``train()`` mode with gradients enabled, ``z`` carries the gradient chosen by
    ``grad`` to ``f``'s parameters and to every input that requires grad: ``F(z*)`` for
    IFT/NPG/OneStep, the unrolled ``h_k`` for UPG, the (best) iterate of the recorded forward
    iteration for BPTT. In ``eval()`` mode ``z`` is the solver's (best) solution without a
    graph — unless ``grad_in_eval=True``, which attaches the same estimator in eval mode too
    (with the eval solver for the forward solve), e.g. for saliency maps or adversarial
    evaluation of a trained model. Under ``torch.no_grad()`` nothing is attached. How the
    gradient is attached, and what that needs from the solver, is the estimator's: the DEQ hands
    each forward pass to :meth:`~phantomdeq.grad.GradientEstimator.equilibrium` and lets the
    estimator refuse the solvers it cannot work with
    (:meth:`~phantomdeq.grad.GradientEstimator.check_solver`).

    Mixed precision. Called inside ``torch.autocast`` (``with torch.autocast("cuda"): out =
    model(x)``), ``f`` runs under the caller's autocast with its output cast back to ``z0``'s
    dtype; the state, the solvers' arithmetic and ``z`` keep ``z0``'s dtype
    (:func:`~phantomdeq.precision.under_autocast`). Outside autocast, an ``f`` whose output
    dtype differs from ``z0``'s is refused.

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
    (with ``N = 1``: ``[z]`` and ``[1.0]``, the plain estimator). With
    ``Correction(..., mode="sliced")`` the solve runs instead in ``N`` segments of
    ``max_iter // N`` evaluations, each supervised, the next starting from the previous
    state's value (TorchDEQ's ``DEQSliced``; :mod:`phantomdeq.grad.correction`).
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
        """The solvers and estimator checked against each other: the estimator refuses the
        solvers it cannot attach its gradient after (``eval_solver`` too with
        ``grad_in_eval``), the correction and the captured solves what they cannot record."""
        grad = check_estimator(grad, owner="DEQ")
        solver = check_solver(solver, "solver", owner="DEQ")
        if eval_solver is not None:
            eval_solver = check_solver(eval_solver, "eval_solver", owner="DEQ")
        solvers: list[tuple[str, Solver]] = [("solver", solver)]
        if eval_solver is not None:
            solvers.append(("eval_solver", eval_solver))
        for name, chosen in solvers if self.grad_in_eval else solvers[:1]:
            grad.check_solver(chosen, name)
        if self.correction is not None:
            self.correction.check(grad, solvers, cuda_graph=self.cuda_graph)
        if self.cuda_graph:
            grad.check_graphed()
            for name, chosen in solvers:
                check_graphable(chosen, name)
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

    def _overridden(self, solver: Solver, overrides: object, attach: bool) -> Solver:
        """This call's solver: ``solver`` with the options ``overrides`` (``solver_kwargs`` of
        :meth:`forward`), checked as the constructor checks a solver."""
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            raise TypeError(
                f"DEQ: solver_kwargs must be a dict of option names to values, got "
                f"{type(overrides).__name__} {overrides!r}"
            )
        try:
            new = with_options(solver, **overrides)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"DEQ: solver_kwargs: {exc}") from exc
        new = check_solver(new, "solver", owner="DEQ")
        if attach:
            self.grad.check_solver(new, "solver")
            if self.correction is not None:
                self.correction.check(self.grad, [("solver", new)], cuda_graph=False)
        return new

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, grad={self.grad!r}, eval_solver={self.eval_solver!r}, "
            f"grad_in_eval={self.grad_in_eval}, cuda_graph={self.cuda_graph}"
            + ("" if self.correction is None else f", correction={self.correction!r}")
        )

    def forward(
        self, z0: State, *inputs: Any, solver_kwargs: dict[str, Any] | None = None
    ) -> tuple[State, Solution]:
        spec = StateSpec.of(z0)
        attach = torch.is_grad_enabled() and (self.training or self.grad_in_eval)
        solver = self.solver if (self.training or self.eval_solver is None) else self.eval_solver
        if solver_kwargs:
            solver = self._overridden(solver, solver_kwargs, attach)
        if self.training and isinstance(self.f, nn.Module):
            update_norms(self.f)
        graphed = (
            self.cuda_graph
            and not solver_kwargs
            and isinstance(solver, SolverBase)
            and self._graphs.supports(spec.device)
            and not sync_free()
        )
        fp = ForwardPass(
            under_autocast(self.f, z0),
            inputs,
            z0,
            spec,
            solver,
            on_nonfinite=self.on_nonfinite,
            graphs=self._graphs if graphed else None,
        )
        if not attach:
            sol = fp.solve()
            return sol.z, sol
        corr = self.correction
        if corr is not None and corr.sliced and not self.grad.tracks_forward:
            return corr.solve_sliced(self.grad, fp)
        recorder = None if corr is None else corr.record(fp, self.grad)
        z, sol = self.grad.equilibrium(fp)
        if corr is not None and recorder is not None:
            corr.attach_states(self.grad, fp, recorder, sol, z)
        return z, sol
