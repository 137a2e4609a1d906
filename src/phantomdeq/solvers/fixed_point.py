"""Damped fixed-point iteration, paper eq. (13): h <- damping * g(h) + (1 - damping) * h."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._state import FlatFn, State, StateSpec, as_tuple, like
from .._validate import check_float
from ..precision import caller_autocast, in_autocast
from .base import Solution, SolverBase, compute_dtype, sync_free
from .tracker import Tracker


class FixedPoint(SolverBase):
    """Damped fixed-point iteration (paper eq. 13).

    ``damping`` is λ in eq. (13); ``damping=1`` is plain Picard iteration (eq. 10).
    """

    name = "fixed_point"

    def __init__(
        self,
        *,
        max_iter: int = 30,
        tol: float = 1e-4,
        stop: str = "rel",
        damping: float = 1.0,
        check_every: int | None = None,
        freeze_converged: bool = False,
    ) -> None:
        super().__init__(
            max_iter=max_iter,
            tol=tol,
            stop=stop,
            check_every=check_every,
            freeze_converged=freeze_converged,
        )
        self.damping = check_float(
            "damping", damping, owner="FixedPoint", low=0.0, high=1.0, low_open=True
        )

    def _options(self) -> dict[str, object]:
        opts = {**super()._options(), "damping": self.damping}
        return {**opts, "freeze_converged": True} if self.freeze_converged else opts

    def _solve(self, gf: FlatFn, x0: Tensor, tracker: Tracker) -> None:
        x = x0
        while True:
            fx = gf(x)
            if tracker.update(x, fx):
                return
            # new tensors each step: the tracker may hold the previous iterate as the best one
            x = fx if self.damping == 1.0 else torch.lerp(x, fx, self.damping)

    def unroll(self, g: Callable[[State], Any], z0: State) -> tuple[State, Solution]:
        """Differentiable run of the same iteration (for BPTT): records the autograd graph of every
        step and returns, per sample, the best iterate (the one in the returned
        :class:`Solution`'s ``z``) with its graph, plus the solve statistics.

        Stops at the same point as :meth:`__call__` would (``tol`` reached by every sample, or
        ``max_iter``); the returned state is differentiable w.r.t. everything ``g`` uses. The
        bookkeeping runs without graph, outside the caller's autocast, in float32 or wider.
        """
        if sync_free() and not self.fixed_budget:
            return _eager_unroll(self, g, z0)  # see SolverBase.__call__
        spec = StateSpec.of(z0)
        cdt = compute_dtype(spec.dtype)

        def flat(z: State) -> Tensor:
            return spec.flatten(z).detach().to(cdt, copy=True)

        tracker = Tracker(self, flat(z0), sync_free=sync_free())
        if spec.batch == 0:  # one evaluation keeps the (empty) output connected to f
            return like(spec, spec.check(g(z0), who="f")), tracker.solution(spec)
        amp = caller_autocast(spec.device.type)
        if amp is None:
            iterates = self._unroll_loop(g, z0, spec, tracker, flat)
        else:
            with torch.autocast(spec.device.type, enabled=False):
                g_amp = in_autocast(g, spec.device.type, *amp)
                iterates = self._unroll_loop(g_amp, z0, spec, tracker, flat)
        sol = tracker.solution(spec)
        return _select(spec, iterates, sol.nstep), sol

    def _unroll_loop(
        self,
        g: Callable[[State], Any],
        z0: State,
        spec: StateSpec,
        tracker: Tracker,
        flat: Callable[[State], Tensor],
    ) -> list[State]:
        lam = self.damping
        z = z0
        iterates: list[State] = []
        while True:
            fz_parts = spec.check(g(z), who="f")
            fz = like(spec, fz_parts)
            with torch.no_grad():
                stop = tracker.update(flat(z), spec.flatten(fz).detach().to(tracker.best.dtype))
            iterates.append(z)
            if stop:
                return iterates
            if lam == 1.0:
                z = fz
            else:
                z = like(spec, [lam * a + (1.0 - lam) * b for a, b in zip(fz_parts, as_tuple(z))])


@torch.compiler.disable
def _eager_unroll(
    solver: FixedPoint, g: Callable[[State], Any], z0: State
) -> tuple[State, Solution]:
    """``solver.unroll(g, z0)`` outside ``torch.compile``'s tracing."""
    return solver.unroll(g, z0)


@torch.compiler.disable
def _select(spec: StateSpec, iterates: list[State], nstep: Tensor) -> State:
    """Per sample, the iterate recorded at evaluation ``nstep`` (the first one if none improved),
    differentiably; the last iterate itself when it is every sample's best. It reads ``nstep``
    on the host, so ``torch.compile`` does not trace it (the values would become guards)."""
    last = len(iterates) - 1
    index = (nstep - 1).clamp_(min=0)
    if bool((index == last).all()):
        return iterates[last]
    parts = list(as_tuple(iterates[last]))
    for k in sorted(set(index.tolist()) - {last}):
        mask = index == k
        parts = [
            torch.where(mask.view(-1, *([1] * (p.dim() - 1))), q, p)
            for p, q in zip(parts, as_tuple(iterates[k]))
        ]
    return like(spec, parts)
