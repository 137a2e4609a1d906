"""Back-propagation through the forward solver's iterations (reference estimator)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._state import State, StateSpec
from ..solvers.base import Solution
from .base import Cell, GradientEstimator


class BPTT(GradientEstimator):
    """Back-propagate through every forward iteration (eq. 11 / eq. 14 with T = solver steps).

    The DEQ module runs its forward ``FixedPoint`` solver with autograd recording and returns, per
    sample, the best iterate (the solution in ``info.z``); memory grows linearly with the number
    of iterations. Only differentiable
    solvers qualify: the fixed-point iteration (with any damping).
    """

    name = "bptt"
    tracks_forward = True

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
