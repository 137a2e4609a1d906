"""Limited-memory ("good") Broyden root finding on r(x) = g(x) - x."""

from __future__ import annotations

import torch
from torch import Tensor

from .._state import FlatFn
from .._validate import check_int
from .base import SolverBase, _Tracker


class Broyden(SolverBase):
    """Broyden's method for ``g(z) - z = 0`` with an inverse-Jacobian estimate
    ``J⁻¹ ≈ H = -I + Σ_i u_i v_iᵀ`` (rank-one "good Broyden" updates, per sample).

    Each step is ``p = -H r`` (``r = g(x) - x``). After it, with ``s = p`` and ``y = r_new - r``,
    the good-Broyden update of the current ``H`` gives the pair ``v = Hᵀ s``,
    ``u = (s - H y) / (vᵀ y)``. ``memory`` bounds the number of stored pairs (``None`` keeps every
    step up to ``max_iter``): once ``memory`` pairs are stored, the new pair (computed from the
    full current ``H``) replaces the oldest one — limited-memory good Broyden. Per iteration:
    four passes over the stored pairs (products ``V r`` and ``U s``), a dozen vector passes.
    For half/bfloat16 states the pairs and updates are float32.
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

    def _solve(self, gf: FlatFn, x0: Tensor, tracker: _Tracker) -> None:
        # Notation: r = g(x) - x, H = -I + U Vᵀ (rows of U, V stored per sample), step p = -H r.
        # The step satisfies s + H r = 0, so s - H y = -H r_new =: q and the good-Broyden pair of
        # the current H is  v = Hᵀ s = -s + V (Uᵀ s),  u = q / (vᵀ y).  The next step uses the
        # updated H' = H + u vᵀ - [u_e v_eᵀ if the oldest pair e is evicted]:
        #   p' = -H' r_new = q (1 - vᵀ r_new / vᵀ y) + u_e (v_eᵀ r_new).
        b, d = x0.shape
        m = self.memory if self.memory is not None else self.max_iter
        dtype, dev = x0.dtype, x0.device
        # slot i is written before it is read (only [:n] is read): no zero fill of m x (B, D)
        U = torch.empty(b, m, d, dtype=dtype, device=dev)
        V = torch.empty(b, m, d, dtype=dtype, device=dev)
        tiny = torch.finfo(dtype).eps ** 2
        x = x0
        fx = gf(x)
        r = fx - x
        if tracker.update(x, fx, diff=r):
            return
        p = r  # H = -I initially
        n = 0
        k = 0
        while True:
            x = x + p
            fx = gf(x)
            r_new = fx - x
            if tracker.update(x, fx, diff=r_new):
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
            torch.mul(q, torch.where(ok, 1.0 / safe, 0.0), out=U[:, slot])
            torch.mul(vt, ok, out=V[:, slot])
            n = min(n + 1, m)
            factor = torch.where(ok, 1.0 - vr_new / safe, 1.0)
            p = q * factor if evicted is None else torch.addcmul(evicted, q, factor)
            r = r_new
