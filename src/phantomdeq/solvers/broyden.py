"""Limited-memory ("good") Broyden root finding on r(x) = g(x) - x."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._state import FlatFn, State, StateSpec
from .._validate import check_int
from .base import Solution, SolverBase, into, sync_free
from .inverse import LowRankInverse
from .tracker import Tracker


class Broyden(SolverBase):
    """Broyden's method for ``g(z) - z = 0`` with an inverse-Jacobian estimate
    ``J⁻¹ ≈ H = -I + Σ_i u_i v_iᵀ`` (rank-one "good Broyden" updates, per sample).

    Each step is ``p = -H r`` (``r = g(x) - x``). After it, with ``s = p`` and ``y = r_new - r``,
    the good-Broyden update of the current ``H`` gives the pair ``v = Hᵀ s``,
    ``u = (s - H y) / (vᵀ y)``. ``memory`` bounds the number of stored pairs (``None`` keeps every
    step up to ``max_iter``): once ``memory`` pairs are stored, the new pair (computed from the
    full current ``H``) replaces the oldest one — limited-memory good Broyden.

    Cost per iteration. While no pair is evicted (``memory=None``, or ``memory >= max_iter - 2``)
    the pairs are not stored as vectors: every ``u_i`` is a multiple of the step direction
    that followed it, every ``v_i`` a combination of the step directions, and every direction a
    combination of the residuals ``r_i``, so the residuals themselves (one state per iteration,
    half the memory of ``U`` and ``V``, each written once when ``r = g(x) - x`` is formed) and
    small coefficient matrices represent ``H`` exactly. An iteration then makes two passes over
    the stored residuals (one batched product for all the inner products it needs, one that
    forms the next iterate) beside forming the residual and the norm of ``x`` (the tracker's):
    ``2j + 11`` state reads and writes at iteration ``j``. With evictions the pairs are stored
    (four passes over them per iteration). For half/bfloat16 states the pairs and updates are
    float32.

    :meth:`solve_with_inverse` also returns the final ``H`` (``Solution.inverse``, a
    :class:`~phantomdeq.solvers.LowRankInverse`), the estimate ``grad=SHINE()`` reuses.
    """

    name = "broyden"

    def __init__(
        self,
        *,
        max_iter: int = 30,
        tol: float = 1e-4,
        stop: str = "rel",
        memory: int | None = None,
        check_every: int | None = None,
    ) -> None:
        super().__init__(max_iter=max_iter, tol=tol, stop=stop, check_every=check_every)
        self.memory = (
            None if memory is None else check_int("memory", memory, minimum=1, owner="Broyden")
        )

    def _options(self) -> dict[str, object]:
        return {**super()._options(), "memory": self.memory}

    def solve_with_inverse(self, g: Callable[[State], Any], z0: State) -> Solution:
        """:meth:`__call__` that also keeps the inverse-Jacobian estimate of its last iterate:
        ``sol.inverse`` is ``H = -I + Σ_i u_i v_iᵀ ≈ (∂g/∂z - I)⁻¹`` over the pairs made so far
        (a copy: the solver's buffers are reused by the next solve; memory about one state per
        iteration). Run eagerly under ``torch.compile`` (a graph break)."""
        if sync_free():
            return _eager_with_inverse(self, g, z0)
        spec = StateSpec.of(z0)
        tracker = self._iterate(g, z0, spec, sync_free=False, keep_inverse=True)
        if tracker.inverse is None:  # an empty batch
            empty = torch.zeros(spec.batch, 0, spec.dim, dtype=tracker.best.dtype)
            tracker.inverse = LowRankInverse(empty.to(spec.device), empty.to(spec.device))
        return tracker.solution(spec)

    def _solve(self, gf: FlatFn, x0: Tensor, tracker: Tracker) -> None:
        # a solve makes at most max_iter - 2 pairs (none after the first and the last evaluation)
        if self.memory is None or self.memory >= self.max_iter - 2:
            self._solve_residuals(gf, x0, tracker)
        else:
            self._solve_pairs(gf, x0, tracker)

    def _solve_residuals(self, gf: FlatFn, x0: Tensor, tracker: Tracker) -> None:
        """Good Broyden without evictions, ``H`` kept in the basis of the residuals.

        The step directions are ``w_0 = r_0`` and ``w_{j+1} = q_j = -H_j r_{j+1}``; step ``j``
        is ``p_j = φ_j w_j`` (``φ_0 = 1``, ``φ_{j+1}`` = the factor below). The pair made at step
        ``j`` is ``u_j = β_j w_{j+1}`` (``β_j = 1 / vᵀy``, 0 for a skipped pair) and
        ``v_j = Σ_{i<=j} C[j, i] w_i``. Every direction is a combination of the residuals,
        ``w_k = Σ_{l<=k} T[k, l] r_l`` (``T`` unit lower triangular: ``q = r - Σ_i a_i β_i
        w_{i+1}``), so only the residuals are stored, each written once by ``r = g(x) - x``,
        with their Gram matrix ``<r_l, r_k>`` (one new row per step) and ``T``.

        At step ``j``, one product of ``r_{j+1}`` with the stored residuals gives ``ρ = Rᵀ r``
        (and ``|r|²``, the tracker's residual); then ``<w_i, r> = (T ρ)_i``, the Gram column
        ``γ_i = <w_i, w_j> = (T Gram Tᵀ)[i, j]``, ``a = Vᵀ r = C T ρ``, ``c_i = u_iᵀ p_j =
        β_i φ_j γ_{i+1}``, ``v_j = -p_j + Σ_i c_i v_i`` (``C[j] = -φ_j e_j + cᵀ C``),
        ``vᵀ r_{j+1} = C[j]·Tρ`` and ``vᵀ r_j = -|p_j|² = -φ_j² γ_j`` are small per-sample
        products, and a second product with the residuals makes the next iterate,
        ``x + φ_{j+1} w_{j+1} = x + Σ_l φ_{j+1} T[j+1, l] r_l``. State streams at step ``j``
        (each operand of a product counted): ``r = g(x) - x`` into its slot 3, the first
        product ``j + 3``, ``|x|`` 1, the second product ``j + 4``: ``2j + 11``, four fewer than
        with the directions stored (their update ``q = r - U a`` in place, then ``x + φ q``).
        The same iterates as :meth:`_solve_pairs` without evictions, to rounding.
        """
        b, d = x0.shape
        slots = self.max_iter  # r_0 .. r_{max_iter - 1}: one per evaluation of g
        dtype, dev = x0.dtype, x0.device
        # slot j is written before it is read: no zero fill of max_iter x (B, D)
        R = tracker.buffer("broyden_R", b, slots, d, like=x0)
        gram = torch.zeros(b, slots, slots, dtype=dtype, device=dev)  # <r_l, r_k>
        T = torch.zeros(b, slots, slots, dtype=dtype, device=dev)  # w_k = Σ T[k, l] r_l
        C = torch.zeros(b, slots, slots, dtype=dtype, device=dev)  # v_i = Σ C[i, l] w_l
        beta = torch.empty(b, slots, dtype=dtype, device=dev)  # u_i = beta_i w_{i+1}
        tiny = torch.finfo(dtype).eps ** 2
        x = x0
        fx = gf(x)
        r = into(R[:, 0], torch.sub, fx, x)  # r_0 = w_0, the first step (H = -I)
        res = torch.linalg.vector_norm(r, dim=1)
        if tracker.update(x, fx, abs_res=res):
            _keep_residuals(tracker, R, T, C, beta, 0)
            return
        gram[:, 0, 0] = res * res
        T[:, 0, 0] = 1.0
        phi = torch.ones(b, 1, dtype=dtype, device=dev)
        x = torch.add(x, r)  # x_1 = x_0 + w_0
        j = 0
        while True:
            fx = gf(x)
            r = into(R[:, j + 1], torch.sub, fx, x)  # r_{j+1}
            if tracker.last:  # no new step after the final evaluation
                tracker.update(x, fx, diff=r)
                _keep_residuals(tracker, R, T, C, beta, j)
                return
            # <r_l, r_{j+1}> for l <= j + 1: (B, 1, D) @ (B, D, j + 2) on a transposed view,
            # one pass over the stored residuals; the last entry is |r|², the tracker's residual
            rho = torch.bmm(R[:, j + 1 : j + 2], R[:, : j + 2].transpose(1, 2)).squeeze(1)
            if tracker.update(x, fx, abs_res=rho[:, j + 1].sqrt()):
                _keep_residuals(tracker, R, T, C, beta, j)
                return
            gram[:, j + 1, : j + 2] = rho
            gram[:, : j + 2, j + 1] = rho
            Tj = T[:, : j + 1, : j + 1]
            rho_w = torch.bmm(Tj, rho[:, : j + 1, None])  # <w_i, r>, i <= j: (B, j + 1, 1)
            # <w_i, w_j> = Σ_{l,k} T[i, l] <r_l, r_k> T[j, k], i <= j
            gw = torch.bmm(gram[:, : j + 1, : j + 1], T[:, j, : j + 1, None])
            gamma = torch.bmm(Tj, gw).squeeze(2)
            t_new = torch.zeros(b, 1, j + 2, dtype=dtype, device=dev)  # w_{j+1} in residuals
            t_new[:, 0, j + 1] = 1.0
            row = torch.zeros(b, 1, j + 1, dtype=dtype, device=dev)
            if j:
                Cj = C[:, :j, : j + 1]
                a = torch.bmm(Cj, rho_w).squeeze(2)  # Vᵀ r over the stored pairs
                # q = r - U a: w_{j+1} = r_{j+1} - Σ_i a_i beta_i w_{i+1}
                t_new[:, :, : j + 1] -= torch.bmm(
                    (beta[:, :j] * a).unsqueeze(1), T[:, 1 : j + 1, : j + 1]
                )
                c = beta[:, :j] * phi * gamma[:, 1:]  # u_iᵀ p_j
                row = torch.bmm(c.unsqueeze(1), Cj)  # Σ c_i C[i]
            row[:, 0, j] -= phi[:, 0]
            vr_new = torch.bmm(row, rho_w).view(b, 1)  # vᵀ r_{j+1}
            denom = vr_new + phi * phi * gamma[:, j : j + 1]  # vᵀ y = vᵀ r_{j+1} + |p_j|²
            ok = denom.abs() > tiny
            safe = torch.where(ok, denom, torch.ones_like(denom))
            inv = torch.where(ok, 1.0 / safe, 0.0)
            beta[:, j : j + 1] = inv
            C[:, j, : j + 1] = row.squeeze(1) * ok
            T[:, j + 1, : j + 2] = t_new.squeeze(1)
            phi = torch.where(ok, 1.0 - vr_new * inv, 1.0)
            # x + p_{j+1} = x + φ_{j+1} Σ_l T[j+1, l] r_l: the second pass over the residuals
            step = t_new * phi.unsqueeze(2)
            x = torch.baddbmm(x.unsqueeze(1), step, R[:, : j + 2]).squeeze(1)
            j += 1

    def _solve_pairs(self, gf: FlatFn, x0: Tensor, tracker: Tracker) -> None:
        # Notation: r = g(x) - x, H = -I + U Vᵀ (rows of U, V stored per sample), step p = -H r.
        # The step satisfies s + H r = 0, so s - H y = -H r_new =: q and the good-Broyden pair of
        # the current H is  v = Hᵀ s = -s + V (Uᵀ s),  u = q / (vᵀ y).  The next step uses the
        # updated H' = H + u vᵀ - [u_e v_eᵀ if the oldest pair e is evicted]:
        #   p' = -H' r_new = q (1 - vᵀ r_new / vᵀ y) + u_e (v_eᵀ r_new).
        b, d = x0.shape
        m = self.memory if self.memory is not None else self.max_iter
        dtype = x0.dtype
        # slot i is written before it is read (only [:n] is read): no zero fill of m x (B, D)
        U = tracker.buffer("broyden_U", b, m, d, like=x0)
        V = tracker.buffer("broyden_V", b, m, d, like=x0)
        tiny = torch.finfo(dtype).eps ** 2
        x = x0
        fx = gf(x)
        r = fx - x
        if tracker.update(x, fx, diff=r):
            _keep_pairs(tracker, U, V, 0)
            return
        p = r  # H = -I initially
        n = 0
        k = 0
        while True:
            x = x + p
            fx = gf(x)
            r_new = fx - x
            if tracker.update(x, fx, diff=r_new):
                _keep_pairs(tracker, U, V, n)
                return
            slot = k % m
            k += 1
            evicted: Tensor | None = None
            if n:
                # products with the stored pairs as (B, 1, D) @ (B, D, n) on transposed views
                # (batched GEMMs over contiguous rows; the (B, n, D) @ (B, D, 1) form is slow)
                a_new = torch.bmm(r_new.unsqueeze(1), V[:, :n].transpose(1, 2))  # (B, 1, n) Vᵀr
                q = torch.baddbmm(r_new.unsqueeze(1), a_new, U[:, :n], alpha=-1.0).squeeze(1)
                if n == m:  # the oldest pair (in `slot`) leaves H': keep its share u_e v_eᵀ r_new
                    evicted = U[:, slot] * a_new[:, :, slot]
                c = torch.bmm(p.unsqueeze(1), U[:, :n].transpose(1, 2))  # (B, 1, n) = Uᵀ s
                vt = torch.baddbmm(p.unsqueeze(1), c, V[:, :n], beta=-1.0).squeeze(1)
            else:
                q = r_new
                vt = -p
            vr_new = torch.linalg.vecdot(vt, r_new).unsqueeze(1)
            denom = vr_new - torch.linalg.vecdot(vt, r).unsqueeze(1)  # vᵀ y
            ok = denom.abs() > tiny
            safe = torch.where(ok, denom, torch.ones_like(denom))
            into(U[:, slot], torch.mul, q, torch.where(ok, 1.0 / safe, 0.0))
            into(V[:, slot], torch.mul, vt, ok)
            n = min(n + 1, m)
            factor = torch.where(ok, 1.0 - vr_new / safe, 1.0)
            p = q * factor if evicted is None else torch.addcmul(evicted, q, factor)
            r = r_new


def _keep_residuals(
    tracker: Tracker, R: Tensor, T: Tensor, C: Tensor, beta: Tensor, n: int
) -> None:
    """With ``tracker.keep_inverse``: ``H`` over the first ``n`` pairs of the residuals form,
    ``u_i = β_i w_{i+1}``, ``v_i = Σ_l C[i, l] w_l`` with ``w_k = Σ_l T[k, l] r_l``, i.e.
    ``H = -I + L K Rᵀ`` with ``L = [w_1 .. w_n]`` (made here: one product), ``K = diag(β)
    C[:n, :n] T[:n, :n+1]`` and ``R = [r_0 .. r_n]`` (a copy: the buffer is reused)."""
    if not tracker.keep_inverse:
        return
    q = n + 1 if n else 0
    left = torch.bmm(T[:, 1 : n + 1, :q], R[:, :q])
    core = torch.bmm(beta[:, :n, None] * C[:, :n, :n], T[:, :n, :q])
    tracker.inverse = LowRankInverse(left=left, right=R[:, :q].clone(), core=core)


def _keep_pairs(tracker: Tracker, U: Tensor, V: Tensor, n: int) -> None:
    """With ``tracker.keep_inverse``: ``H = -I + Σ_i u_i v_iᵀ`` over the ``n`` stored pairs."""
    if not tracker.keep_inverse:
        return
    tracker.inverse = LowRankInverse(left=U[:, :n].clone(), right=V[:, :n].clone())


@torch.compiler.disable
def _eager_with_inverse(solver: Broyden, g: Callable[[State], Any], z0: State) -> Solution:
    """``solver.solve_with_inverse(g, z0)`` outside ``torch.compile``'s tracing."""
    return solver.solve_with_inverse(g, z0)
