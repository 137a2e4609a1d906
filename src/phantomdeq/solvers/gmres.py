"""Restarted GMRES for the IFT backward system ``(I - (∂F/∂h)ᵀ) v = g``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_int
from .linear import LinearOp, LinearSolverBase, dot, safe_div
from .solution import REL_EPS
from .tracker import Tracker


class GMRES(LinearSolverBase):
    """Restarted GMRES(``restart``) (Saad & Schultz 1986) for ``x = op(x) + rhs``, i.e.
    ``A x = rhs`` with ``A = I - op``, per sample (see :class:`LinearSolverBase` for the
    interface, the options ``max_iter``/``tol``/``stop`` and the reported residuals).

    A cycle starts from the residual ``r = rhs - A x`` (free for ``x = 0``; otherwise the
    product that re-measured the previous cycle's residual) and builds an orthonormal basis
    ``v_1 = r/‖r‖, ..., v_k`` of the Krylov space ``K_k(A, r)`` by Arnoldi with classical
    Gram-Schmidt applied twice (one batched product with the basis per pass), one product
    ``A v_j`` per step. The Hessenberg least-squares problem ``min_y ‖‖r‖ e_1 - H̄ y‖`` is kept
    triangular by Givens rotations, so its residual -- ``‖rhs - A(x + V y)‖`` in exact arithmetic
    -- is known at every step. A cycle ends after ``restart`` steps, or earlier when every
    sample's estimate reaches ``tol``; then ``x <- x + V y`` and its residual is re-measured
    with one product (the next cycle's start). Within exact arithmetic GMRES with
    ``restart >= D`` solves a ``D``-dimensional system in at most ``D`` steps (``D + 1``
    products with the re-measurement).

    Happy breakdown (``A v_j`` in the span of the basis: the solution lies in the current
    space, the least-squares residual is zero) is detected per sample
    (``h_{j+1,j} <= eps ‖A v_j‖``); that sample's later basis vectors are zero and contribute
    nothing. Memory: ``restart + 1`` states per sample.
    """

    name = "gmres"

    def __init__(
        self, *, max_iter: int = 30, tol: float = 1e-6, stop: str = "rel", restart: int = 20
    ) -> None:
        super().__init__(max_iter=max_iter, tol=tol, stop=stop)
        self.restart = check_int("restart", restart, minimum=1, owner="GMRES")

    def _options(self) -> dict[str, object]:
        return {**super()._options(), "restart": self.restart}

    def _solve(
        self, apply_a: LinearOp, b: Tensor, x: Tensor, zero_start: bool, tracker: Tracker
    ) -> None:
        r, stop = self.start(apply_a, b, x, zero_start, tracker)
        if stop:
            return
        bsz, d = b.shape
        basis = tracker.buffer("gmres_V", bsz, self.restart + 1, d, like=b)
        while True:
            steps = min(self.restart, self.budget(tracker))
            if steps <= 0:  # only the reserved product is left: a last step, not re-measured
                steps = min(self.restart, self.max_iter - tracker.niter)
                if steps <= 0:
                    return
            x_new, estimate, k = self._cycle(apply_a, r, x, basis, steps)
            tracker.update(x_new, None, abs_res=estimate, evals=k)
            if tracker.niter >= self.max_iter:
                return
            r, stop = self.verify(apply_a, b, tracker)
            if stop:
                return
            x = tracker.best

    def _cycle(
        self, apply_a: LinearOp, r: Tensor, x: Tensor, basis: Tensor, steps: int
    ) -> tuple[Tensor, Tensor, int]:
        """At most ``steps`` Arnoldi steps from ``x`` with residual ``r``; returns the new
        iterate, its least-squares residual estimate (B,) and the number of steps made."""
        bsz = r.shape[0]
        dtype, dev = r.dtype, r.device
        eps = torch.finfo(dtype).eps
        beta = torch.linalg.vector_norm(r, dim=1)
        broken = (beta > 0).logical_not_()  # zero residual (or NaN): nothing to do
        basis[:, 0].copy_(safe_div(r, beta[:, None], ~broken[:, None]))
        tri = torch.zeros(bsz, steps, steps, dtype=dtype, device=dev)  # rotated H̄
        gvec = torch.zeros(bsz, steps + 1, dtype=dtype, device=dev)
        gvec[:, 0] = beta
        cs = torch.zeros(bsz, steps, dtype=dtype, device=dev)
        sn = torch.zeros(bsz, steps, dtype=dtype, device=dev)
        test = self.tol > 0.0
        rel = self.stop == "rel"
        xv = torch.zeros(bsz, steps + 1, dtype=dtype, device=dev)  # <x, v_i>, for ‖x_k‖
        xx = dot(x, x)
        if test and rel:
            xv[:, 0] = dot(x, basis[:, 0])
        k = 0
        for j in range(steps):
            w = apply_a(basis[:, j])
            w_norm = torch.linalg.vector_norm(w, dim=1)
            vj = basis[:, : j + 1]
            h = torch.bmm(vj, w.unsqueeze(2)).squeeze(2)  # (B, j + 1)
            w = w - torch.bmm(h.unsqueeze(1), vj).squeeze(1)
            h2 = torch.bmm(vj, w.unsqueeze(2)).squeeze(2)  # second Gram-Schmidt pass
            w = w - torch.bmm(h2.unsqueeze(1), vj).squeeze(1)
            h = h + h2
            hn = torch.linalg.vector_norm(w, dim=1)
            broken = broken | (hn <= eps * w_norm)
            hn = torch.where(broken, 0.0, hn)
            basis[:, j + 1].copy_(safe_div(w, hn[:, None], ~broken[:, None]))
            for i in range(j):  # the previous rotations on the new column
                hi, hk = h[:, i].clone(), h[:, i + 1].clone()
                h[:, i] = cs[:, i] * hi + sn[:, i] * hk
                h[:, i + 1] = cs[:, i] * hk - sn[:, i] * hi
            den = torch.hypot(h[:, j], hn)
            ok = den > 0
            cs[:, j] = safe_div(h[:, j], den, ok) + (~ok).to(dtype)
            sn[:, j] = safe_div(hn, den, ok)
            h[:, j] = torch.where(ok, den, 1.0)  # a zero column (v_j = 0): y_j = 0
            gvec[:, j + 1] = -sn[:, j] * gvec[:, j]
            gvec[:, j] = cs[:, j] * gvec[:, j]
            tri[:, : j + 1, j] = h
            k = j + 1
            if test and k < steps:
                est = gvec[:, k].abs()
                if rel:
                    xv[:, k] = dot(x, basis[:, k])
                    y = _triangular(tri[:, :k, :k], gvec[:, :k])
                    # ‖x + V y‖² with V orthonormal (its zero columns add nothing)
                    xn2 = xx + 2.0 * dot(y, xv[:, :k]) + dot(y, y)
                    est = est / (xn2.clamp(min=0.0).sqrt() + REL_EPS)
                done = (est <= self.tol) | broken | ~torch.isfinite(est)
                if bool(done.all()):
                    break
        y = _triangular(tri[:, :k, :k], gvec[:, :k])
        x_new = x + torch.bmm(y.unsqueeze(1), basis[:, :k]).squeeze(1)
        return x_new, gvec[:, k].abs(), k


def _triangular(tri: Tensor, rhs: Tensor) -> Tensor:
    """Per-sample solution of the upper-triangular ``tri y = rhs``: ``(B, k)``."""
    return torch.linalg.solve_triangular(tri, rhs.unsqueeze(2), upper=True).squeeze(2)
