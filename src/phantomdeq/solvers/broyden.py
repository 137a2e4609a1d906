"""Limited-memory ("good") Broyden root finding on r(x) = g(x) - x."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

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

    def _solve(self, gf: Callable[[Tensor], Tensor], x0: Tensor, tracker: _Tracker) -> None:
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
        Ua = torch.zeros_like(r)  # U (V r) for the current pairs
        p = r.clone()  # -J⁻¹ r with J⁻¹ = -I
        n = 0
        k = 0
        while True:
            x = x + p
            fx = gf(x)
            r_new = fx - x
            if tracker.update(x, fx, diff=r_new):
                return
            a_new = torch.bmm(V[:, :n], r_new.unsqueeze(-1)).squeeze(-1) if n else None  # (B, n)
            Ua_new = (
                torch.bmm(a_new.unsqueeze(1), U[:, :n]).squeeze(1) if n else torch.zeros_like(r)
            )
            y = r_new - r
            jy = Ua_new - Ua - y  # J⁻¹ y
            if n:
                c = torch.bmm(U[:, :n], p.unsqueeze(-1))  # (B, n, 1): Uᵀ s
                vt = torch.bmm(c.transpose(1, 2), V[:, :n]).squeeze(1) - p  # sᵀ J⁻¹
            else:
                vt = -p
            denom = (vt * y).sum(dim=1, keepdim=True)
            ok = denom.abs() > tiny
            u = torch.where(ok, (p - jy) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
            vt = torch.where(ok, vt, 0.0)
            slot = k % m
            k += 1
            if n == m and a_new is not None:  # evict the oldest pair from the cached product
                Ua_new -= U[:, slot] * a_new[:, slot : slot + 1]
            U[:, slot] = u
            V[:, slot] = vt
            n = min(n + 1, m)
            Ua_new += u * (vt * r_new).sum(dim=1, keepdim=True)
            p = r_new - Ua_new
            Ua, r = Ua_new, r_new
