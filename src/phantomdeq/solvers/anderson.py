"""Anderson acceleration (type-II, with mixing ``beta`` and Tikhonov regularisation ``lam``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._state import FlatFn
from .._validate import check_float, check_int
from .base import SolverBase, into
from .tracker import Tracker


class Anderson(SolverBase):
    """Anderson acceleration of ``z = g(z)`` with a memory of ``m`` past iterates.

    Each step picks weights α (Σα = 1) minimising ``||Σ α_i (g(x_i) - x_i)||² + lam ||α||²`` and
    sets ``x = Σ α_i (beta g(x_i) + (1 - beta) x_i)``. Histories live in one ring buffer of shape
    ``(B, m, 2, D)`` (the residual and the mixed image of each slot side by side); the Gram
    matrix is updated by one row per step (``m`` inner products per sample instead of ``m²``). A singular or ill-posed small system never raises: ``solve_ex`` reports
    it per sample and that sample falls back to a plain (damped) fixed-point step. Every product
    is per sample, so a sample that turns non-finite cannot reach the others. For half/bfloat16
    states the histories, Gram matrix and small solve are float32.
    """

    name = "anderson"

    def __init__(
        self,
        *,
        max_iter: int = 30,
        tol: float = 1e-4,
        stop: str = "rel",
        m: int = 5,
        beta: float = 1.0,
        lam: float = 1e-4,
        check_every: int | None = None,
    ) -> None:
        super().__init__(max_iter=max_iter, tol=tol, stop=stop, check_every=check_every)
        self.m = check_int("m", m, minimum=1, owner="Anderson")
        self.beta = check_float("beta", beta, owner="Anderson", low=0.0, high=1.0, low_open=True)
        self.lam = check_float("lam", lam, owner="Anderson", low=0.0)

    def _options(self) -> dict[str, object]:
        return {**super()._options(), "m": self.m, "beta": self.beta, "lam": self.lam}

    def _solve(self, gf: FlatFn, x0: Tensor, tracker: Tracker) -> None:
        b, d = x0.shape
        m, beta = self.m, self.beta
        dtype, dev = x0.dtype, x0.device
        # G: residual history g(x_i) - x_i ; Y: mixed images beta*g(x_i) + (1-beta)*x_i. One
        # buffer, each slot the pair (G_i, Y_i) side by side: with beta = 1 a single pass over
        # g(x) and x writes both (read 2 states, write 2) instead of a copy of g(x) into Y and a
        # subtraction into G (read 3, write 2). The products read G and Y as strided views.
        GY = tracker.buffer("anderson_GY", b, m, 2, d, like=x0)
        G, Y = GY[:, :, 0], GY[:, :, 1]
        # [g(x), g(x)] + [x, x] * [-1, 0] = [g(x) - x, g(x)] (exact: x * 0 adds a zero), when g
        # returns its own output (a single state in the compute dtype: no copy of g(x) to save)
        fused = beta == 1.0 and getattr(gf, "returns_output", False)
        signs = torch.tensor([-1.0, 0.0], dtype=dtype, device=dev).view(1, 2, 1)
        gram = torch.zeros(b, m, m, dtype=dtype, device=dev)
        x = x0
        n = 0  # number of valid history slots
        k = 0  # insertion counter
        while True:
            slot = k % m
            n = min(n + 1, m)
            if fused:
                fx = gf(x)
                into(GY[:, slot], torch.addcmul, fx.unsqueeze(1), x.unsqueeze(1), signs)
            else:
                # a map that copies anyway (tuple state, low precision) writes g(x) straight
                # into its slot (with beta = 1, the mixed image is g(x) itself)
                fx = gf(x, out=Y[:, slot]) if beta == 1.0 else gf(x)
                into(G[:, slot], torch.sub, fx, x)
            # one new row/column of the Gram matrix: <G_i, G_slot> for the valid slots, the
            # slot itself included (its diagonal entry is the tracker's squared residual).
            # (B, 1, D) @ (B, D, n) on a transposed view of the history: a batched GEMM over
            # contiguous rows, several times faster on CPU than the (B, n, D) @ (B, D, 1) form
            row = torch.bmm(G[:, slot].unsqueeze(1), G[:, :n].transpose(1, 2)).squeeze(1)
            if tracker.update(x, fx, abs_res=row[:, slot].sqrt()):
                return
            k += 1
            if beta != 1.0:
                into(Y[:, slot], torch.lerp, x, fx, beta)
            gram[:, slot, :n] = row
            gram[:, :n, slot] = row
            if n == 1:
                x = Y[:, slot].clone()
                continue
            alpha = self._weights(gram[:, :n, :n], slot)  # (B, n)
            x = torch.bmm(alpha.unsqueeze(1), Y[:, :n]).squeeze(1)

    def _weights(self, gram: Tensor, newest_slot: int) -> Tensor:
        """Solve the bordered system [[0, 1ᵀ], [1, H + lam·s·I]] [μ; α] = [1; 0] per sample.

        ``s`` is the mean of diag(H), so ``lam`` is relative to the residuals' scale.
        """
        b, n, _ = gram.shape
        dtype, dev = gram.dtype, gram.device
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(dtype).tiny)
        H = torch.zeros(b, n + 1, n + 1, dtype=dtype, device=dev)
        H[:, 0, 1:] = 1.0
        H[:, 1:, 0] = 1.0
        H[:, 1:, 1:] = gram
        H[:, 1:, 1:].diagonal(dim1=1, dim2=2).add_(self.lam * scale[:, None])
        rhs = torch.zeros(b, n + 1, 1, dtype=dtype, device=dev)
        rhs[:, 0] = 1.0
        sol, info = torch.linalg.solve_ex(H, rhs)
        alpha = sol[:, 1:, 0]
        bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1)
        # fall back to the newest iterate alone (a plain fixed-point step) where the solve failed
        newest = torch.zeros_like(alpha)
        newest[:, newest_slot] = 1.0
        return torch.where(bad[:, None], newest, alpha)
