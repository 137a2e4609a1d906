"""Exact implicit gradient by the implicit function theorem (paper eq. 4), and its derivative."""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._state import State, StateSpec, as_tuple
from .._validate import check_choice
from ..errors import DEQError
from ..solvers.base import LinearSolver, Solution, Solver, check_solver
from ..solvers.fixed_point import FixedPoint
from ..solvers.inverse import LowRankInverse
from .base import (
    BackwardRule,
    Cell,
    GradientEstimator,
    NodeState,
    VJPAt,
    attach_rule,
    reapply,
)
from .second_order import AdjointSolve, ImplicitPoint, relink

# frames inside these folders are skipped when a warning picks its location (the user's call)
_SKIP_DIRS = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
)


def _warn_at_caller(message: str) -> None:
    """``RuntimeWarning`` attributed to the first frame outside torch and this package's
    ``grad`` folder (e.g. the user's ``loss.backward()`` line), so that Python's default filter
    shows it once per call site (the message text is constant)."""
    frame = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


#: initial guesses of IFT's backward solve (``IFT(init=...)``)
INIT_MODES = ("default", "shine")


class _ImplicitRule(BackwardRule):
    needs_point = True

    def __init__(
        self, owner: IFT, info: Solution | None, inverse: LowRankInverse | None = None
    ) -> None:
        self.owner = owner
        self.inverse = inverse  # init="shine": the forward Broyden estimate H
        # the forward Solution, to publish the backward solve as info.backward (weak: the graph
        # must not keep the user's info alive)
        self.info = None if info is None else weakref.ref(info)

    # ---------------------------------------------------------------- the linear solves
    def solve(self, op: Callable[[Tensor], Tensor], rhs: Tensor, *, what: str) -> Tensor:
        """Solve ``u = op(u) + rhs`` on the flat ``(B, D)`` state with the IFT's solver: a
        :class:`~phantomdeq.solvers.LinearSolver` gets ``op`` and ``rhs``, a fixed-point
        solver the map ``u -> op(u) + rhs`` from ``rhs``."""
        solver = self.owner.solver
        x0: Tensor | None = None
        if self.inverse is not None:
            # SHINE's estimate of the solution: (I - Jᵀ)⁻¹ = -(J - I)⁻ᵀ ≈ -Hᵀ (backward);
            # the adjoint system (I - J) u = c: -H c
            est = self.inverse.rmatvec(rhs) if what == "backward" else self.inverse.matvec(rhs)
            x0 = est.neg_()
        if isinstance(solver, LinearSolver):
            sol = solver.solve_linear(op, rhs, x0)
        else:
            sol = self._solve_fixed_point(op, rhs, rhs if x0 is None else x0)
        return self._checked(sol, rhs, what)

    def _solve_fixed_point(
        self, op: Callable[[Tensor], Tensor], rhs: Tensor, start: Tensor
    ) -> Solution:
        def fixed_point_map(u: State) -> Tensor:
            if not isinstance(u, Tensor):
                raise TypeError(
                    f"IFT: the backward state is a (B, D) tensor, got {type(u).__name__}"
                )
            # out of place: autograd.grad may return the cotangent itself (pass-through or view
            # cells), i.e. ``op(u)`` can be the solver's iterate
            return op(u) + rhs

        return self.owner.solver(fixed_point_map, start)  # type: ignore[operator]

    def _checked(self, sol: Solution, rhs: Tensor, what: str) -> Tensor:
        z = getattr(sol, "z", None)
        if not isinstance(z, Tensor) or z.shape != rhs.shape:
            raise TypeError(
                f"IFT: solver {self.owner.solver!r} must return a Solution whose z is a tensor "
                f"of the shape of z0 {tuple(rhs.shape)}, got {type(sol).__name__} with z="
                f"{type(z).__name__}"
            )
        if what == "backward":
            self.owner.last_backward = sol
            info = None if self.info is None else self.info()
            if info is not None:
                info.backward = sol
        else:
            self.owner.last_adjoint = sol
        if sol.result == "nonfinite":
            raise DEQError(
                f"IFT {what} solve produced non-finite values after "
                f"{sol.niter} iterations (batch-max residual trace tail: {sol.trace[-3:]}); "
                "the fixed point is probably not attracting (spectral radius of ∂F/∂h >= 1)"
            )
        if sol.result != "converged" and self.owner.warn_unconverged:
            _warn_at_caller(
                f"IFT {what} solve did not reach the solver's tol within max_iter: the "
                f"gradient is approximate (statistics: info.backward, IFT.last_{what}; "
                "IFT(..., warn_unconverged=False) silences this)"
            )
        return z

    # ---------------------------------------------------------------- first order
    def __call__(self, g: Tensor, vjp: Callable[[Tensor], Tensor]) -> Tensor:
        return self.solve(vjp, g, what="backward").clone()

    # ---------------------------------------------------------------- create_graph
    def create_graph_backward(
        self, node: NodeState, grads: tuple[Tensor, ...]
    ) -> tuple[Tensor | None, ...]:
        """``θ̄, x̄ = J_{θ,x}(h*, θ, x)ᵀ v`` built as a differentiable function of ``g``, θ, x
        and ``h*(θ, x)`` (see :mod:`phantomdeq.grad.second_order`); ``y``'s graph gets nothing."""
        point: ImplicitPoint = node.point
        extras = point.extras
        y_r, z_r, x_r = point.evaluate(check=True)
        # h*(θ, x) as a new node whose backward is this IFT backward (the implicit map)
        anchors = reapply(node, extras)
        n = len(grads)
        v = AdjointSolve.apply(self, node.vjp, point, n, *grads, *anchors, *extras)
        live = [i for i, y in enumerate(y_r) if y.requires_grad]
        targets = [*point.params, *x_r]
        partial: tuple[Tensor | None, ...]
        if live and targets:
            partial = torch.autograd.grad(
                [y_r[i] for i in live],
                targets,
                [v[i] for i in live],
                create_graph=True,
                allow_unused=True,
            )
        else:
            partial = (None,) * len(targets)
        params_grads = partial[: len(point.params)]
        x_grads = partial[len(point.params) :]
        # partial derivatives at the leaves z_r, x_r -> total derivatives
        linked = relink([*anchors, *point.xs], [*z_r, *x_r], [*params_grads, *x_grads])
        return (*([None] * n), *linked)


class IFT(GradientEstimator):
    """Exact implicit gradient (paper eq. 4): solve ``v = (∂F/∂h)ᵀ v + g`` with the backward
    ``solver`` (vector-Jacobian products only), then back-propagate ``v`` through one tracked
    evaluation ``y = F(h*)`` to the parameters and inputs. Memory O(1) in depth.

    ``solver`` is anything callable as ``solver(g, z0) -> Solution``; it is called on the flat
    ``(B, D)`` state. A linear solver (:class:`~phantomdeq.solvers.GMRES`,
    :class:`~phantomdeq.solvers.BiCGStab`: the :class:`~phantomdeq.solvers.LinearSolver`
    protocol) instead receives the map ``u -> (∂F/∂h)ᵀ u`` and ``g`` and solves
    ``(I - (∂F/∂h)ᵀ) v = g`` by a Krylov method (from ``v = 0``). The latest backward solve's :class:`~phantomdeq.Solution` is kept in
    :attr:`last_backward` and published on the forward ``info`` as ``info.backward``. A
    non-finite backward solve raises :class:`~phantomdeq.DEQError`; one that stops without
    reaching ``tol`` emits a ``RuntimeWarning`` (once per call site) unless
    ``warn_unconverged=False``.

    Second order (``create_graph=True``): the derivative of the exact implicit gradient, i.e.
    true second derivatives of ``L(h*(θ, x))``. The backward solve is differentiated as the
    implicit linear system it is (an adjoint solve ``u = (∂F/∂h) u + c`` with the same
    ``solver``, statistics in :attr:`last_adjoint`), and ``h*``'s dependence on θ and x by the
    IFT again. ``f`` is evaluated once more at ``h*`` (it must be deterministic within a step)
    and may depend only on its state, the DEQ inputs and its own parameters (anything else
    requiring grad is refused). Third order raises.

    ``init`` is the backward solve's initial guess: ``"default"`` (``g`` for a fixed-point
    solver, zero for a linear one) or ``"shine"``: SHINE's estimate ``-Hᵀ g`` from the forward
    Broyden solve's inverse estimate ``H`` (:class:`~phantomdeq.grad.SHINE`; the adjoint solve
    starts from ``-H c``), which then needs ``solver=Broyden(...)`` in the DEQ. The solve
    refines the estimate to its ``tol`` ("SHINE refine").
    """

    name = "ift"

    def __init__(
        self,
        *,
        solver: Solver | LinearSolver | None = None,
        warn_unconverged: bool = True,
        init: str = "default",
    ) -> None:
        self.solver: Solver | LinearSolver
        if isinstance(solver, LinearSolver) and not isinstance(solver, type):
            self.solver = solver
        else:
            self.solver = check_solver(
                FixedPoint(max_iter=30, tol=1e-6) if solver is None else solver,
                "solver",
                owner="IFT",
            )
        if not isinstance(warn_unconverged, bool):
            raise TypeError(
                f"IFT: warn_unconverged must be True or False, got {warn_unconverged!r}"
            )
        self.warn_unconverged = warn_unconverged
        self.init = check_choice("init", init, INIT_MODES, owner="IFT")
        self.needs_forward_inverse = self.init == "shine"
        self.last_backward: Solution | None = None
        self.last_adjoint: Solution | None = None

    def _options(self) -> dict[str, object]:
        opts: dict[str, object] = {"solver": self.solver, "warn_unconverged": self.warn_unconverged}
        return {**opts, "init": self.init} if self.init != "default" else opts

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        if info is not None:
            info.backward = None
        inverse = None
        if self.init == "shine":
            inverse = None if info is None else info.inverse
            if inverse is None:
                raise ValueError(
                    "IFT(init='shine') needs the forward solve's inverse-Jacobian estimate "
                    "(info.inverse): use it through phantomdeq.DEQ with solver=Broyden(...)"
                )

        def point_factory(vjp: VJPAt) -> tuple[ImplicitPoint, list[Tensor]]:
            point = ImplicitPoint(f, inputs, as_tuple(vjp.z_req), spec)
            return point, point.extras

        rule = _ImplicitRule(self, info, inverse)
        return attach_rule(rule, f, z_star, inputs, spec, point_factory=point_factory)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["last_backward"] = None
        state["last_adjoint"] = None
        return state
