"""Gradient estimators for the DEQ output: exact (IFT), phantom (UPG, NPG) and references."""

from __future__ import annotations

import inspect
from typing import Any

from .base import GradientEstimator
from .bptt import BPTT
from .implicit import IFT
from .neumann import NPG
from .unrolled import UPG, OneStep

ESTIMATORS: dict[str, type[GradientEstimator]] = {
    "ift": IFT,
    "upg": UPG,
    "npg": NPG,
    "onestep": OneStep,
    "bptt": BPTT,
}


def from_name(name: str, **options: Any) -> GradientEstimator:
    """Build an estimator from its name (``ift``, ``upg``, ``npg``, ``onestep``, ``bptt``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {name!r}; allowed: {', '.join(ESTIMATORS)}")
    cls = ESTIMATORS[key]
    allowed = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for estimator {key!r}; allowed: {', '.join(allowed) or 'none'}"
        )
    return cls(**options)


__all__ = ["BPTT", "ESTIMATORS", "GradientEstimator", "IFT", "NPG", "OneStep", "UPG", "from_name"]
