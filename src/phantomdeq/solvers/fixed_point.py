"""Damped fixed-point iteration, paper eq. (13): h <- damping * g(h) + (1 - damping) * h."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._state import FlatFn, State, StateSpec, as_tuple, like
from .base import Solution, Solver, _check_float, _Tracker


class FixedPoint(Solver):
    """Damped fixed-point iteration (paper eq. 13).

    ``damping`` is λ in eq. (13); ``damping=1`` is plain Picard iteration (eq. 10).
    """

    name = "fixed_point"

    def __init__(
        self,
        max_iter: int = 30,
        tol: float = 1e-4,
        stop: str = "rel",
        damping: float = 1.0,
        *,
        check_every: int | None = None,
    ) -> None:
        super().__init__(max_iter, tol, stop, check_every=check_every)
        self.damping = _check_float(
            "damping", damping, owner="FixedPoint", low=0.0, high=1.0, low_open=True
        )

    def _options(self) -> dict[str, object]:
        return {**super()._options(), "damping": self.damping}

    def _solve(self, gf: FlatFn, x0: Tensor, tracker: _Tracker) -> None:
        x = x0
        while True:
            fx = gf(x)
            if tracker.update(x, fx):
                return
            # new tensors each step: the tracker may hold the previous iterate as the best one
            x = fx if self.damping == 1.0 else torch.lerp(x, fx, self.damping)

    def unroll(
        self, g: Callable[[State], object], z0: State, spec: StateSpec
    ) -> tuple[State, Solution]:
        """Differentiable run of the same iteration (for BPTT): records the autograd graph of every
        step and returns the *last* iterate plus the solve statistics (computed without graph).

        Stops at the same point as :meth:`__call__` would (``tol`` reached by every sample, or
        ``max_iter``); the returned state is differentiable w.r.t. everything ``g`` uses.
        """
        z = z0
        tracker = _Tracker(self, spec.flatten(z0).detach().clone())
        lam = self.damping
        while True:
            fz_parts = spec.check(g(z), who="f")
            fz = like(spec, fz_parts)
            with torch.no_grad():
                stop = tracker.update(
                    spec.flatten(z).detach().clone(), spec.flatten(fz).detach().clone()
                )
            if stop:
                break
            if lam == 1.0:
                z = fz
            else:
                z = like(spec, [lam * a + (1.0 - lam) * b for a, b in zip(fz_parts, as_tuple(z))])
        sol = tracker.solution(spec)
        return z, sol
