"""Unrolled phantom gradient (UPG, paper eq. 17) and the one-step gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .._state import State, StateSpec, as_tuple, detach, like
from ..solvers.base import Solution
from .base import Cell, GradientEstimator, check_k, check_lam


def _damped_step(f: Cell, spec: StateSpec, lam: float, h: State, *inputs: Any) -> State:
    fh = spec.check(f(h, *inputs))
    if lam == 1.0:
        return like(spec, list(fh))
    return like(spec, [lam * a + (1.0 - lam) * b for a, b in zip(fh, as_tuple(h))])


class UPG(GradientEstimator):
    """Unrolled phantom gradient ``A^unr_{k,λ}`` (paper eq. 17).

    From the detached forward solution ``h_0 = h*``, unroll ``k`` damped steps
    ``h_{t+1} = λ F(h_t) + (1 − λ) h_t`` (eq. 13) with autograd and return ``h_k``; back-propagating
    through them yields exactly eq. (17) with the Jacobians taken along that trajectory.
    Memory O(k). With ``checkpoint=True`` each step is recomputed in the backward pass, so only
    the k step inputs are stored (O(1) activations per step).
    """

    name = "upg"

    def __init__(self, *, k: int = 5, lam: float = 0.5, checkpoint: bool = False) -> None:
        self.k = check_k(k, "UPG")
        self.lam = check_lam(lam, "UPG")
        if not isinstance(checkpoint, bool):
            raise ValueError(f"UPG: checkpoint must be True or False, got {checkpoint!r}")
        self.checkpoint = checkpoint

    def _options(self) -> dict[str, object]:
        return {"k": self.k, "lam": self.lam, "checkpoint": self.checkpoint}

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        h = detach(z_star)
        with torch.enable_grad():
            for _ in range(self.k):
                if self.checkpoint:
                    h = checkpoint(_damped_step, f, spec, self.lam, h, *inputs, use_reentrant=False)
                else:
                    h = _damped_step(f, spec, self.lam, h, *inputs)
        return h


class OneStep(GradientEstimator):
    """One-step (Jacobian-free) gradient: output ``F(h*)`` with ``h*`` detached, i.e. ``A = ∂F/∂θ``.
    Equal to ``UPG(k=1, lam=1)``."""

    name = "onestep"

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        with torch.enable_grad():
            return like(spec, list(spec.check(f(detach(z_star), *inputs))))
