"""The outcome of a solve: :class:`Solution` and :class:`SolveResult` (shared by the solvers, the
tracker that builds them and the DEQ that reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .._state import State
from .inverse import LowRankInverse

#: denominator guard of the relative residual ||g(z) - z|| / (||z|| + REL_EPS); the residuals are
#: computed in float32 or wider (see :func:`compute_dtype`), where it neither underflows nor
#: changes a relative residual of a state of norm >= 1e-6 by more than 1e-6.
REL_EPS = 1e-12


class SolveResult(str, Enum):
    """Outcome of a solve. A ``str`` subclass: ``sol.result == "converged"`` works."""

    CONVERGED = "converged"  #: every sample reached ``tol``
    MAX_ITER = "max_iter"  #: the iteration budget ran out first
    NONFINITE = "nonfinite"  #: at least one sample hit inf/NaN (see ``Solution.nonfinite``)

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


@dataclass
class Solution:
    """Outcome of a fixed-point solve ``z = g(z)``.

    Every per-sample field has shape ``(B,)``. ``z`` is the best (lowest-residual) iterate of
    each sample, in the structure and dtype of ``z0``. ``residual`` is in the solver's stop mode;
    ``abs_residual`` is ``||g(z) - z||`` and ``rel_residual`` is ``||g(z) - z|| / ||z||`` (the
    paper's ``||h - F(h)|| / ||h||``), in float32 for half/bfloat16 states (the solvers' own
    precision). ``nstep`` is, per sample, the number of ``g`` evaluations until its returned
    iterate was found. ``converged`` is ``residual <= tol`` per sample. ``nonfinite`` marks the
    samples that hit inf/NaN: each was frozen at that point (its ``z``, residuals and ``nstep``
    are those of its best finite iterate; a residual stays ``inf`` if none was ever measured,
    ``converged`` is False) while the rest of the batch kept iterating. ``trace`` holds, per
    iteration, the largest residual (stop mode) over the samples not marked non-finite.
    ``result`` is a :class:`SolveResult`: ``"converged"`` (every sample reached ``tol``),
    ``"max_iter"`` or ``"nonfinite"`` (some sample is marked in ``nonfinite``). ``backward``
    is set on a DEQ's forward ``info`` when ``grad=IFT(...)`` runs its backward solve: that
    solve's own :class:`Solution` (None until then, and for the other estimators).
    ``states`` and ``state_weights`` are set on a DEQ's forward ``info`` under fixed-point
    correction (:class:`~phantomdeq.grad.Correction`): the supervised states along the
    trajectory, the DEQ's output last, each carrying its phantom gradient, and their loss
    weights (None otherwise).
    """

    z: State
    nstep: Tensor
    residual: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    converged: Tensor
    nonfinite: Tensor | None = None
    trace: list[float] = field(default_factory=list)
    result: SolveResult = SolveResult.MAX_ITER
    niter: int = 0
    stop: str = "rel"
    tol: float = 0.0
    backward: Solution | None = None
    states: list[Any] | None = None
    state_weights: list[float] | None = None
    inverse: LowRankInverse | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.result, SolveResult):
            if not isinstance(self.result, str):
                raise TypeError(
                    f"Solution.result must be a SolveResult or one of "
                    f"{[r.value for r in SolveResult]}, got {type(self.result).__name__}"
                )
            try:
                self.result = SolveResult(self.result)
            except ValueError:
                raise ValueError(
                    f"Solution.result must be one of {[r.value for r in SolveResult]}, "
                    f"got {self.result!r}"
                ) from None
        if self.nonfinite is None:
            self.nonfinite = torch.full_like(
                self.converged, self.result is SolveResult.NONFINITE, dtype=torch.bool
            )
