"""The DEQ layer: solve ``z* = f(z*, *inputs)`` without a graph, then attach a gradient."""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from torch import nn

from ._state import State, StateSpec, detach
from .errors import DEQError
from .grad.base import GradientEstimator
from .solvers.base import Solution, Solver
from .solvers.fixed_point import FixedPoint

NONFINITE_MODES = ("raise", "warn")


class DEQ(nn.Module):
    """Deep equilibrium layer around a cell ``f(z, *inputs) -> z``.

    ``forward(z0, *inputs)`` returns ``(z, info)``. The forward ``solver`` (or ``eval_solver`` in
    eval mode, when given) solves the fixed point without recording a graph. In ``train()`` mode
    with gradients enabled, ``z`` carries the gradient chosen by ``grad`` to ``f``'s parameters
    and to every input that requires grad: ``F(z*)`` for IFT/NPG/OneStep, the unrolled ``h_k``
    for UPG, the last iterate for BPTT. In ``eval()`` mode or under ``torch.no_grad()``, ``z`` is
    the solver's (best) solution. ``info`` is the forward :class:`~phantomdeq.Solution`.

    Non-finite values stop the solver; with ``on_nonfinite="raise"`` (default) :class:`DEQError`
    is raised, with ``"warn"`` a warning is emitted and the best finite iterates are returned.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        solver: Solver,
        grad: GradientEstimator,
        eval_solver: Solver | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        if not callable(f):
            raise ValueError(f"DEQ: f must be callable (an nn.Module), got {type(f).__name__}")
        if not isinstance(solver, Solver):
            raise ValueError(f"DEQ: solver must be a phantomdeq solver, got {solver!r}")
        if eval_solver is not None and not isinstance(eval_solver, Solver):
            raise ValueError(
                f"DEQ: eval_solver must be a phantomdeq solver or None, got {eval_solver!r}"
            )
        if not isinstance(grad, GradientEstimator):
            raise ValueError(
                f"DEQ: grad must be a phantomdeq.grad estimator (IFT, UPG, NPG, OneStep, BPTT), got {grad!r}"
            )
        if grad.tracks_forward and not isinstance(solver, FixedPoint):
            raise ValueError(
                f"DEQ: grad=BPTT() back-propagates through the forward iterations and needs "
                f"solver=FixedPoint(...), got {type(solver).__name__}"
            )
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(
                f"DEQ: on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}"
            )
        self.f = f
        self.solver = solver
        self.eval_solver = eval_solver
        self.grad = grad
        self.on_nonfinite = on_nonfinite

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, grad={self.grad!r}, eval_solver={self.eval_solver!r}"

    def forward(self, z0: State, *inputs: Any) -> tuple[State, Solution]:
        spec = StateSpec.of(z0)
        attach = self.training and torch.is_grad_enabled()
        solver = self.solver if (self.training or self.eval_solver is None) else self.eval_solver
        f = self.f

        def g(z: State) -> Any:
            return f(z, *inputs)

        if attach and self.grad.tracks_forward:
            z, sol = cast(FixedPoint, solver).unroll(g, z0, spec)  # checked in __init__
            self._check(sol, "forward (BPTT)")
            return z, sol
        sol = solver(g, detach(z0))
        self._check(sol, "forward")
        if not attach:
            return sol.z, sol
        return self.grad.attach(f, sol.z, inputs, spec, info=sol), sol

    def _check(self, sol: Solution, what: str) -> None:
        if sol.result != "nonfinite":
            return
        msg = (
            f"DEQ {what} solve hit non-finite values at iteration {sol.niter}: "
            f"batch-max residual {sol.trace[-1] if sol.trace else float('nan')} "
            f"({sol.stop}); best finite residuals kept for "
            f"{int(torch.isfinite(sol.residual).sum())}/{sol.residual.numel()} samples"
        )
        if self.on_nonfinite == "raise":
            raise DEQError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
