"""A user's plugin module (``plugins: [user_plugins]`` in a training config): a solver and a
gradient estimator registered at import."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import phantomdeq as pdq


@pdq.solvers.register("relaxed")
class Relaxed(pdq.solvers.SolverBase):
    """Relaxed fixed-point iteration ``x <- x + relax (g(x) - x)``."""

    name = "relaxed"

    def __init__(
        self, *, max_iter: int = 30, tol: float = 1e-4, stop: str = "rel", relax: float = 1.0
    ) -> None:
        super().__init__(max_iter=max_iter, tol=tol, stop=stop)
        if not 0.0 < relax <= 1.0:
            raise ValueError(f"Relaxed: relax must be in (0, 1], got {relax!r}")
        self.relax = relax

    def _solve(self, gf: Any, x0: Tensor, tracker: Any) -> None:
        x = x0
        while True:
            fx = gf(x)
            if tracker.update(x, fx):
                return
            x = torch.lerp(x, fx, self.relax)


class HalfStep(pdq.grad.GradientEstimator):
    """One relaxed step from the detached solution: ``h* + alpha (F(h*) - h*)``."""

    name = "halfstep"

    def __init__(self, *, alpha: float = 0.5) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"HalfStep: alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha

    def attach(self, f: Any, z_star: Any, inputs: Any, spec: Any, *, info: Any = None) -> Any:
        tup = isinstance(z_star, tuple)
        h = tuple(t.detach() for t in z_star) if tup else z_star.detach()
        with torch.enable_grad():
            fh = f(h, *inputs)
            if tup:
                return tuple(a + self.alpha * (b - a) for a, b in zip(h, fh))
            return h + self.alpha * (fh - h)


pdq.grad.register("halfstep", HalfStep)
