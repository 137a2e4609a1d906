"""The low-rank inverse-Jacobian estimate a quasi-Newton forward solve leaves behind
(:class:`LowRankInverse`), reused by ``grad=SHINE()`` for the backward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LowRankInverse:
    """Per sample, ``H = -I + L K Rᵀ``: the estimate of the inverse Jacobian of the residual
    ``r(z) = g(z) - z`` that :class:`~phantomdeq.solvers.Broyden` builds (``H ≈ (∂g/∂z - I)⁻¹``
    at its last iterate), on flat ``(B, D)`` states.

    ``left`` is ``(B, p, D)`` (rows ``L_i``), ``right`` ``(B, q, D)`` (rows ``R_l``) and
    ``core`` ``(B, p, q)`` or None for the identity (``p = q``):
    ``H x = -x + Σ_i L_i Σ_l K[i, l] ⟨R_l, x⟩``. With Broyden's rank-one pairs ``u_i v_iᵀ``,
    ``L_i = u_i`` and ``K R`` stacks the ``v_i``. In the solver's compute dtype (float32 for
    half/bfloat16 states).
    """

    left: Tensor
    right: Tensor
    core: Tensor | None = None

    @property
    def rank(self) -> int:
        """Number of stored rank-one terms (``p``)."""
        return int(self.left.shape[1])

    def _coefficients(self, a: Tensor) -> Tensor:
        return a if self.core is None else torch.bmm(self.core, a)

    def matvec(self, x: Tensor) -> Tensor:
        """``H x`` for flat ``x`` (B, D), in ``x``'s dtype."""
        xc = x.to(self.left.dtype)
        a = torch.bmm(self.right, xc.unsqueeze(2))  # (B, q, 1) = Rᵀ x
        out = torch.bmm(self.left.transpose(1, 2), self._coefficients(a)).squeeze(2) - xc
        return out.to(x.dtype)

    def rmatvec(self, x: Tensor) -> Tensor:
        """``Hᵀ x`` for flat ``x`` (B, D), in ``x``'s dtype."""
        xc = x.to(self.left.dtype)
        a = torch.bmm(self.left, xc.unsqueeze(2))  # (B, p, 1) = Lᵀ x
        c = a if self.core is None else torch.bmm(self.core.transpose(1, 2), a)
        out = torch.bmm(self.right.transpose(1, 2), c).squeeze(2) - xc
        return out.to(x.dtype)

    def dense(self) -> Tensor:
        """``H`` as a dense ``(B, D, D)`` tensor (small problems, tests)."""
        b, _, d = self.left.shape
        eye = torch.eye(d, dtype=self.left.dtype, device=self.left.device).expand(b, d, d)
        kr = self.right if self.core is None else torch.bmm(self.core, self.right)
        return torch.bmm(self.left.transpose(1, 2), kr) - eye

    def without(self, samples: Tensor) -> LowRankInverse:
        """The estimate with the rows of ``samples`` (a ``(B,)`` bool mask) reset to ``-I``
        (their factors zeroed): the non-finite samples of a solve."""

        def cut(t: Tensor) -> Tensor:
            return torch.where(samples.view(-1, 1, 1), t.new_zeros(()), t)

        return LowRankInverse(
            cut(self.left), cut(self.right), None if self.core is None else cut(self.core)
        )
