"""Unrolled phantom gradient (UPG, paper eq. 17) and the one-step gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._state import State, StateSpec, as_tuple, detach, like
from ..solvers.base import Solution
from .adaptive import AUTO, all_below, check_k_auto, refuse_when_compiling, row_norms
from .base import Cell, GradientEstimator, check_lam


def _damped_step(f: Cell, spec: StateSpec, lam: float, h: State, *inputs: Any) -> State:
    fh = spec.check(f(h, *inputs))
    if lam == 1.0:
        return like(spec, list(fh))
    return like(spec, [lam * a + (1.0 - lam) * b for a, b in zip(fh, as_tuple(h))])


class UPG(GradientEstimator):
    """Unrolled phantom gradient ``A^unr_{k,λ}`` (paper eq. 17).

    From the detached forward solution ``h_0 = h*``, unroll ``k`` damped steps
    ``h_{t+1} = λ F(h_t) + (1 − λ) h_t`` (eq. 13) with autograd and return ``h_k``; back-propagating
    through them yields exactly eq. (17) with the Jacobians taken along that trajectory.
    Memory O(k). With ``checkpoint=True`` each step is recomputed in the backward pass, so only
    the k step inputs are stored (O(1) activations per step).

    Adaptive k (``k="auto"``, with ``tol`` and ``k_max``). The unroll stops after the first
    step ``j >= 1`` at which, for every sample, ``‖h_j − h_{j−1}‖ < tol · ‖h_1 − h_0‖``, or after
    ``k_max`` steps; the output is then exactly that of ``UPG(k=j)`` and ``j`` is stored in
    :attr:`last_k`. Why this ratio: near the fixed point ``h_{j+1} − h_j ≈ B (h_j − h_{j−1})``,
    ``B = λ ∂F/∂h + (1 − λ) I``, so it measures ``‖B^j r‖ / ‖r‖`` on the forward residual ``r``
    -- the decay of the very series whose truncation eq. (17) is (the gradient's relative
    truncation error), at no extra evaluation of ``F``. (The change relative to ``‖h_j‖``
    would instead measure the forward solver's residual: it is below ``λ·tol`` of the solve
    from the first step, and smaller the better the solve converged.) The ratio cannot fall
    below the rounding of the state relative to the residual (about ``1e-7 / residual`` in
    float32); a sample that is an exact fixed point (``h_1 = h_0``) gives no measurement and
    runs to ``k_max``. Each step reads one boolean on the host (eager mode only: refused under
    ``torch.compile``; ``DEQ(cuda_graph=True)`` captures only the solve, so it works there).
    """

    name = "upg"

    def __init__(
        self,
        *,
        k: int | str = 5,
        lam: float = 0.5,
        checkpoint: bool = False,
        tol: float | None = None,
        k_max: int | None = None,
    ) -> None:
        fixed, self.tol, self.k_max = check_k_auto(k, tol, k_max, "UPG")
        self.k: int | str = AUTO if fixed is None else fixed
        self.lam = check_lam(lam, "UPG")
        if not isinstance(checkpoint, bool):
            raise ValueError(f"UPG: checkpoint must be True or False, got {checkpoint!r}")
        self.checkpoint = checkpoint
        #: the number of steps of the last :meth:`attach` (= ``k`` unless ``k="auto"``)
        self.last_k: int | None = fixed

    @property
    def adaptive(self) -> bool:
        """True for ``k="auto"``."""
        return self.k == AUTO

    def _options(self) -> dict[str, object]:
        opts: dict[str, object] = {"k": self.k, "lam": self.lam, "checkpoint": self.checkpoint}
        if self.adaptive:
            opts.update(tol=self.tol, k_max=self.k_max)
        return opts

    def correction_estimator(self) -> UPG:
        """A UPG with this one's ``k`` and ``λ`` (and, for ``k="auto"``, ``tol`` and
        ``k_max``)."""
        if self.adaptive:
            return UPG(k="auto", lam=self.lam, tol=self.tol, k_max=self.k_max)
        return UPG(k=self.k, lam=self.lam)

    def _step(self, f: Cell, spec: StateSpec, h: State, inputs: Sequence[Any]) -> State:
        if self.checkpoint:
            return checkpoint(_damped_step, f, spec, self.lam, h, *inputs, use_reentrant=False)  # type: ignore[no-any-return]
        return _damped_step(f, spec, self.lam, h, *inputs)

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        h = detach(z_star)
        if not isinstance(self.k, int):
            return self._attach_auto(f, h, inputs, spec)
        with torch.enable_grad():
            for _ in range(self.k):
                h = self._step(f, spec, h, inputs)
        return h

    def _attach_auto(self, f: Cell, h: State, inputs: Sequence[Any], spec: StateSpec) -> State:
        refuse_when_compiling("UPG")
        if self.tol is None or self.k_max is None:  # set together with k="auto"
            raise RuntimeError("UPG: k='auto' without tol/k_max")
        first: Tensor | None = None
        j = 0
        with torch.enable_grad():
            while j < self.k_max:
                prev = h
                h = self._step(f, spec, h, inputs)
                j += 1
                with torch.no_grad():
                    change = row_norms(_diff(spec, h, prev))
                if first is None:
                    first = change
                if all_below(change, first, self.tol, zero_stops=False):
                    break
        self.last_k = j
        return h


def _diff(spec: StateSpec, a: State, b: State) -> Tensor:
    """``a − b`` flattened to ``(B, D)`` (detached)."""
    return torch.cat(
        [
            (x.detach() - y.detach()).reshape(spec.batch, -1)
            for x, y in zip(as_tuple(a), as_tuple(b))
        ],
        dim=1,
    )


class OneStep(GradientEstimator):
    """One-step (Jacobian-free) gradient: output ``F(h*)`` with ``h*`` detached, i.e. ``A = ∂F/∂θ``.
    Equal to ``UPG(k=1, lam=1)``."""

    name = "onestep"

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        with torch.enable_grad():
            return like(spec, list(spec.check(f(detach(z_star), *inputs))))
