"""Neumann-series phantom gradient (NPG, paper eq. 18)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from .._state import State, StateSpec
from ..solvers.base import Solution
from .base import BackwardRule, Cell, GradientEstimator, attach_rule, check_k, check_lam


class _NeumannRule(BackwardRule):
    def __init__(self, k: int, lam: float) -> None:
        self.k = k
        self.lam = lam

    def __call__(self, g: Tensor, vjp: Callable[[Tensor], Tensor]) -> Tensor:
        lam = self.lam
        w = g
        acc = g.clone()
        for _ in range(self.k - 1):
            jw = vjp(w)
            w = jw if lam == 1.0 else lam * jw + (1.0 - lam) * w  # w <- Bᵀ w
            acc += w
        return acc if lam == 1.0 else lam * acc


class NPG(GradientEstimator):
    """Neumann phantom gradient ``A^neu_{k,λ} = λ ∂F/∂θ (I + B + … + B^{k−1})`` (paper eq. 18),
    ``B = λ ∂F/∂h + (1 − λ) I`` at ``h*``.

    Output ``y = F(h*)``; its incoming gradient ``g`` becomes ``λ Σ_{j<k} (Bᵀ)^j g`` using ``k − 1``
    vector-Jacobian products on the graph of ``y``. Memory O(1) in ``k``.
    """

    name = "npg"

    def __init__(self, *, k: int = 5, lam: float = 0.5) -> None:
        self.k = check_k(k, "NPG")
        self.lam = check_lam(lam, "NPG")

    def _options(self) -> dict[str, object]:
        return {"k": self.k, "lam": self.lam}

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        return attach_rule(_NeumannRule(self.k, self.lam), f, z_star, inputs, spec)
