"""The adaptive number of phantom-gradient steps (``k="auto"`` of :class:`~phantomdeq.UPG` and
:class:`~phantomdeq.NPG`): option validation and the per-sample stopping ratio.

Both phantom gradients are truncations of the same series (paper eqs. 14/15, truncated in
eqs. 17/18): the term after ``j`` steps is ``B^j`` applied to a vector, ``B = λ ∂F/∂h + (1−λ) I``,
so the truncation error falls like ``‖B^j‖``. ``k="auto"`` measures that decay in the backward
pass on the incoming gradient ``g`` of the batch being trained, ``‖(Bᵀ)^j g‖`` against the
partial sum, and stops at the first ``j`` where it is below ``tol`` for every sample (or at
``k_max``); UPG then recomputes and back-propagates that many unrolled steps. Each test reads one boolean on the host, so an adaptive estimator cannot run inside
``torch.compile`` (refused, see :func:`refuse_when_compiling`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_float, check_int
from ..solvers.base import sync_free

AUTO = "auto"


def check_k_auto(
    k: object, tol: object, k_max: object, owner: str
) -> tuple[int | None, float | None, int | None]:
    """``(k, tol, k_max)`` validated: ``k`` an integer >= 1 (then ``tol`` and ``k_max`` must be
    None) or ``"auto"`` (then ``tol`` > 0, default 1e-3, and ``k_max`` >= 1, default 30).
    Returns ``k`` as None for ``"auto"``."""
    if k == AUTO and isinstance(k, str):
        tol_v = (
            1e-3 if tol is None else check_float("tol", tol, owner=owner, low=0.0, low_open=True)
        )
        kmax_v = 30 if k_max is None else check_int("k_max", k_max, minimum=1, owner=owner)
        return None, tol_v, kmax_v
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{owner}: k must be an integer >= 1 or 'auto', got {k!r}")
    for name, value in (("tol", tol), ("k_max", k_max)):
        if value is not None:
            raise ValueError(
                f"{owner}: {name} applies only to k='auto' (the adaptive number of steps); "
                f"got {name}={value!r} with k={k}: drop {name} or set k='auto'"
            )
    return k, None, None


def refuse_when_compiling(owner: str) -> None:
    """``k="auto"`` reads a stopping test on the host at every step; under ``torch.compile``
    each read would split the graph (or fail inside a compiled backward), so it is refused."""
    if sync_free():
        raise RuntimeError(
            f"{owner}(k='auto') reads its stopping test on the host at every step and cannot "
            "run under torch.compile; use a fixed k (e.g. the k it chose, .last_k) when compiling"
        )


def row_norms(flat: Tensor) -> Tensor:
    """Per-sample Euclidean norms of a flat ``(B, D)`` tensor, in float32 or wider."""
    wide = torch.promote_types(flat.dtype, torch.float32)
    return torch.linalg.vector_norm(flat.to(wide), dim=1)


def all_below(num: Tensor, den: Tensor, tol: float, *, zero_stops: bool) -> bool:
    """True when ``num / den < tol`` for every sample (one host read). A sample with
    ``num = den = 0`` counts as below when ``zero_stops`` (nothing left to add), otherwise as
    not below (nothing measurable: run on to ``k_max``); a NaN ratio never counts as below."""
    below = num < tol * den
    if zero_stops:
        below |= (num == 0) & (den == 0)
    return bool(below.all())
