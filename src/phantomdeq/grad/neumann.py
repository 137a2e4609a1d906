"""Neumann-series phantom gradient (NPG, paper eq. 18)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._state import State, StateSpec
from ..solvers.base import Solution
from .adaptive import AUTO, all_below, check_k_auto, refuse_when_compiling, row_norms
from .base import BackwardRule, Cell, GradientEstimator, attach_rule, check_lam
from .unrolled import UPG


class _NeumannRule(BackwardRule):
    """``g -> λ Σ_{j<k} (Bᵀ)^j g``; with ``tol`` set (``k="auto"``), ``k`` is the first number
    of terms whose last term is below ``tol`` times the sum for every sample (at most ``k``,
    then ``k_max``), reported to ``owner.last_k``."""

    def __init__(
        self, k: int, lam: float, tol: float | None = None, owner: NPG | None = None
    ) -> None:
        self.k = k
        self.lam = lam
        self.tol = tol
        self.owner = owner

    def __call__(self, g: Tensor, vjp: Callable[[Tensor], Tensor]) -> Tensor:
        lam = self.lam
        w = g
        acc = g.clone()
        terms = 1
        while terms < self.k:
            jw = vjp(w)
            w = jw if lam == 1.0 else lam * jw + (1.0 - lam) * w  # w <- Bᵀ w
            acc += w
            terms += 1
            if self.tol is not None:
                with torch.no_grad():
                    if all_below(row_norms(w), row_norms(acc), self.tol, zero_stops=True):
                        break
        if self.owner is not None:
            self.owner.last_k = terms
        return acc if lam == 1.0 else lam * acc


class NPG(GradientEstimator):
    """Neumann phantom gradient ``A^neu_{k,λ} = λ ∂F/∂θ (I + B + … + B^{k−1})`` (paper eq. 18),
    ``B = λ ∂F/∂h + (1 − λ) I`` at ``h*``.

    Output ``y = F(h*)``; its incoming gradient ``g`` becomes ``λ Σ_{j<k} (Bᵀ)^j g`` using ``k − 1``
    vector-Jacobian products on the graph of ``y``. Memory O(1) in ``k``.

    Adaptive k (``k="auto"``, with ``tol`` and ``k_max``): in the backward pass the series stops
    after the first term ``(Bᵀ)^j g`` (``j >= 1``) whose norm is below ``tol`` times the norm
    of the sum so far, for every sample, or after ``k_max`` terms; the result is then exactly
    that of ``NPG(k=j+1)`` and ``j + 1`` is stored in :attr:`last_k` (set by the backward pass,
    so read it after ``backward()``). One host read per product (eager mode only: refused
    under ``torch.compile``).
    """

    name = "npg"

    def __init__(
        self,
        *,
        k: int | str = 5,
        lam: float = 0.5,
        tol: float | None = None,
        k_max: int | None = None,
    ) -> None:
        fixed, self.tol, self.k_max = check_k_auto(k, tol, k_max, "NPG")
        self.k: int | str = AUTO if fixed is None else fixed
        self.lam = check_lam(lam, "NPG")
        #: the number of series terms of the last backward pass (= ``k`` unless ``k="auto"``)
        self.last_k: int | None = fixed

    @property
    def adaptive(self) -> bool:
        """True for ``k="auto"``."""
        return self.k == AUTO

    def correction_estimator(self) -> UPG:
        """The unrolled phantom gradient with this one's ``k`` and ``λ`` (and, for ``k="auto"``,
        ``tol`` and ``k_max``): the same truncation of the same series, from an earlier state."""
        if self.adaptive:
            return UPG(k="auto", lam=self.lam, tol=self.tol, k_max=self.k_max)
        return UPG(k=self.k, lam=self.lam)

    def _options(self) -> dict[str, object]:
        opts: dict[str, object] = {"k": self.k, "lam": self.lam}
        if self.adaptive:
            opts.update(tol=self.tol, k_max=self.k_max)
        return opts

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        if isinstance(self.k, int):
            rule = _NeumannRule(self.k, self.lam)
        else:
            refuse_when_compiling("NPG")
            if self.k_max is None:  # set together with k="auto"
                raise RuntimeError("NPG: k='auto' without k_max")
            rule = _NeumannRule(self.k_max, self.lam, self.tol, self)
        return attach_rule(rule, f, z_star, inputs, spec)
