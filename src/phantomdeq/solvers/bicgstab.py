"""BiCGStab for the IFT backward system ``(I - (∂F/∂h)ᵀ) v = g``."""

from __future__ import annotations

import torch
from torch import Tensor

from .linear import LinearOp, LinearSolverBase, dot, safe_div
from .tracker import Tracker


class BiCGStab(LinearSolverBase):
    """BiCGStab (van der Vorst 1992) for ``x = op(x) + rhs``, i.e. ``A x = rhs`` with
    ``A = I - op``, per sample (see :class:`LinearSolverBase` for the interface, the options
    ``max_iter``/``tol``/``stop`` and the reported residuals).

    Each iteration makes two products: ``v = A p``, ``α = ρ / ⟨r̂, v⟩``, the half step
    ``h = x + α p`` with residual ``s = r - α v``; ``t = A s``, ``ω = ⟨t, s⟩ / ⟨t, t⟩``,
    ``x = h + ω s``, ``r = s - ω t``; then ``ρ' = ⟨r̂, r⟩``, ``β = (ρ'/ρ)(α/ω)``,
    ``p = r + β (p - ω v)``. Both the half step and the full step are recorded (one product
    each), with the recurrence residuals ``‖s‖`` and ``‖r‖``. Memory: a few states per sample,
    independent of ``max_iter``.

    Breakdowns, per sample, without inf/NaN: ``⟨r̂, v⟩ ≈ 0`` gives ``α = 0`` (the step
    reduces to the minimal-residual step along ``r``), ``⟨t, t⟩ = 0`` gives ``ω = 0``; after
    either, or when ``ρ' ≈ 0`` (``r ⟂ r̂``), the sample restarts its recurrence with the shadow
    residual ``r̂ = r`` and ``p = r``. When the recurrence reports convergence (or the budget
    ends) the residual of each sample's best iterate is re-measured with one product; if it
    misses ``tol`` the recurrence restarts from there with the true residual.
    """

    name = "bicgstab"

    def __init__(self, *, max_iter: int = 30, tol: float = 1e-6, stop: str = "rel") -> None:
        super().__init__(max_iter=max_iter, tol=tol, stop=stop)

    def _solve(
        self, apply_a: LinearOp, b: Tensor, x: Tensor, zero_start: bool, tracker: Tracker
    ) -> None:
        r, stop = self.start(apply_a, b, x, zero_start, tracker)
        if stop:
            return
        eps = torch.finfo(b.dtype).eps
        norm = torch.linalg.vector_norm
        while True:
            rhat = r.clone()  # the shadow residual
            rho = dot(rhat, r)
            p = r.clone()
            while self.budget(tracker) > 0:
                v = apply_a(p)
                den = dot(rhat, v)
                ok_a = den.abs() > eps * norm(rhat, dim=1) * norm(v, dim=1)
                alpha = safe_div(rho, den, ok_a)
                h = x + alpha[:, None] * p
                s = r - alpha[:, None] * v
                stop = tracker.update(h, None, abs_res=norm(s, dim=1))
                if stop or self.budget(tracker) <= 0:
                    break
                t = apply_a(s)
                tt = dot(t, t)
                omega = safe_div(dot(t, s), tt, tt > 0)
                x = h + omega[:, None] * s
                r = s - omega[:, None] * t
                if tracker.update(x, None, abs_res=norm(r, dim=1)):
                    break
                rho_new = dot(rhat, r)
                restart = (
                    (rho_new.abs() <= eps * norm(rhat, dim=1) * norm(r, dim=1))
                    | (omega == 0)
                    | ~ok_a
                )
                beta = safe_div(rho_new * alpha, rho * omega, ~restart)
                rhat = torch.where(restart[:, None], r, rhat)
                rho = torch.where(restart, dot(r, r), rho_new)
                p = r + beta[:, None] * (p - omega[:, None] * v)
            if tracker.niter >= self.max_iter:
                return
            r, stop = self.verify(apply_a, b, tracker)
            if stop:
                return
            x = tracker.best
