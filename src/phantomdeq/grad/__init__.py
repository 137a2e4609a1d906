"""Gradient estimators for the DEQ output: exact (IFT), phantom (UPG, NPG), the forward
inverse estimate (SHINE) and references."""

from __future__ import annotations

import inspect
from typing import Any

from .._options import registry_options, unknown_options
from .base import GradientEstimator
from .bptt import BPTT
from .correction import Correction, corrected_loss
from .implicit import IFT
from .neumann import NPG
from .shine import SHINE
from .unrolled import UPG, OneStep

ESTIMATORS: dict[str, type[GradientEstimator]] = {
    "ift": IFT,
    "upg": UPG,
    "npg": NPG,
    "onestep": OneStep,
    "bptt": BPTT,
    "shine": SHINE,
}


def from_name(name: str, **options: Any) -> GradientEstimator:
    """Build an estimator from its name (``ift``, ``upg``, ``npg``, ``onestep``, ``bptt``,
    ``shine``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {name!r}; allowed: {', '.join(ESTIMATORS)}")
    unknown_options(ESTIMATORS[key], options, f"estimator {key!r}")
    return ESTIMATORS[key](**options)


def options(name: str) -> dict[str, inspect.Parameter]:
    """The options of the estimator ``name`` (keyword-only constructor parameters: annotation
    and default), where the training config, ``--set``, the ablation grid and the cost table
    take them from. Adding an estimator: its module here plus its line in ``ESTIMATORS``."""
    return registry_options(ESTIMATORS, name, "gradient estimator")


__all__ = [
    "BPTT",
    "ESTIMATORS",
    "Correction",
    "IFT",
    "NPG",
    "SHINE",
    "UPG",
    "GradientEstimator",
    "OneStep",
    "corrected_loss",
    "from_name",
    "options",
]
