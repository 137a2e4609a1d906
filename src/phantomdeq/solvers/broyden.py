"""Limited-memory ("good") Broyden root finding on r(x) = g(x) - x."""

from __future__ import annotations

import torch
from torch import Tensor

from .._state import FlatFn
from .base import Solver, _check_int, _Tracker


class Broyden(Solver):
    """Broyden's method for ``g(z) - z = 0`` with an inverse-Jacobian estimate
    ``J⁻¹ ≈ -I + Σ_i u_i v_iᵀ`` (rank-one "good Broyden" updates, per sample).

    ``memory`` bounds the number of stored pairs (ring buffer; ``None`` keeps every step up to
    ``max_iter``). The step is ``p = -J⁻¹ r``. Costs per iteration: four passes over the stored
    pairs — products ``V r`` and ``U a`` are reused between the update and the next step, and the
    evicted pair's contribution is subtracted rather than recomputed.
    """

    name = "broyden"

    def __init__(
        self,
        max_iter: int = 30,
        tol: float = 1e-4,
        stop: str = "rel",
        memory: int | None = None,
        *,
        check_every: int | None = None,
    ) -> None:
        super().__init__(max_iter, tol, stop, check_every=check_every)
        self.memory = (
            None if memory is None else _check_int("memory", memory, minimum=1, owner="Broyden")
        )

    def _options(self) -> dict[str, object]:
        return {**super()._options(), "memory": self.memory}

    def _solve(self, gf: FlatFn, x0: Tensor, tracker: _Tracker) -> None:
        # Notation: r = g(x) - x, J⁻¹ = -I + U Vᵀ (rows of U, V stored per sample), step p = -J⁻¹ r.
        # With q = r_new - U Vᵀ r_new = -J⁻¹ r_new (before the update), the good-Broyden pair is
        #   v = J⁻ᵀ s = -s + V (Uᵀ s),  u = (s - J⁻¹ y) / (vᵀ y) = q / (vᵀ y)   (s = p, y = r_new - r)
        # because s + J⁻¹ r = 0; and the next step is p = q - u (vᵀ r_new) = q (1 - vᵀr_new / vᵀy).
        # Per iteration: four passes over the stored pairs and a dozen vector passes.
        b, d = x0.shape
        m = self.memory if self.memory is not None else self.max_iter
        dtype, dev = x0.dtype, x0.device
        U = torch.zeros(b, m, d, dtype=dtype, device=dev)
        V = torch.zeros(b, m, d, dtype=dtype, device=dev)
        tiny = torch.finfo(dtype).eps ** 2
        x = x0
        fx = gf(x)
        r = fx - x
        if tracker.update(x, fx, diff=r):
            return
        p = r  # J⁻¹ = -I initially
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
            if n:
                a_new = torch.bmm(V[:, :n], r_new.unsqueeze(-1))  # (B, n, 1) = Vᵀ r_new
                q = torch.baddbmm(
                    r_new.unsqueeze(1), a_new.transpose(1, 2), U[:, :n], alpha=-1.0
                ).squeeze(1)
                if n == m:  # the pair in `slot` is evicted: drop its share of U Vᵀ r_new
                    q.addcmul_(U[:, slot], a_new[:, slot])
                c = torch.bmm(U[:, :n], p.unsqueeze(-1))  # (B, n, 1) = Uᵀ s
                vt = torch.baddbmm(p.unsqueeze(1), c.transpose(1, 2), V[:, :n], beta=-1.0).squeeze(
                    1
                )
            else:
                q = r_new
                vt = -p
            vr_new = torch.einsum("bd,bd->b", vt, r_new).unsqueeze(1)
            denom = vr_new - torch.einsum("bd,bd->b", vt, r).unsqueeze(1)  # vᵀ y
            ok = denom.abs() > tiny
            safe = torch.where(ok, denom, torch.ones_like(denom))
            torch.mul(q, torch.where(ok, 1.0 / safe, 0.0), out=U[:, slot])
            torch.mul(vt, ok, out=V[:, slot])
            n = min(n + 1, m)
            p = q * torch.where(ok, 1.0 - vr_new / safe, 1.0)
            r = r_new
