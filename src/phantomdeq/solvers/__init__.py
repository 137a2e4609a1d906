"""Forward and backward fixed-point solvers.

A solver is any object with ``__call__(g, z0) -> Solution`` that solves ``z = g(z)`` (the
:class:`Solver` protocol); the library's solvers share :class:`SolverBase`.
"""

from __future__ import annotations

import inspect
from typing import Any

from .anderson import Anderson
from .base import (
    Solution,
    Solver,
    SolverBase,
    SolveResult,
    UnrollingSolver,
    check_solver,
    compute_dtype,
)
from .broyden import Broyden
from .fixed_point import FixedPoint

SOLVERS: dict[str, type[SolverBase]] = {
    "fixed_point": FixedPoint,
    "anderson": Anderson,
    "broyden": Broyden,
}


def from_name(name: str, **options: Any) -> SolverBase:
    """Build a solver from its name (``fixed_point``, ``anderson``, ``broyden``) and options.

    Unknown names or options raise ``ValueError`` naming the allowed ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"solver name must be a str, got {type(name).__name__} {name!r}")
    key = name.lower().replace("-", "_")
    if key in ("fixedpoint", "fp", "picard"):
        key = "fixed_point"
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; allowed: {', '.join(SOLVERS)}")
    cls = SOLVERS[key]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for solver {key!r}; allowed: {', '.join(allowed)}"
        )
    return cls(**options)


__all__ = [
    "SOLVERS",
    "Anderson",
    "Broyden",
    "FixedPoint",
    "Solution",
    "SolveResult",
    "Solver",
    "SolverBase",
    "UnrollingSolver",
    "check_solver",
    "compute_dtype",
    "from_name",
]
