"""Forward and backward fixed-point solvers.

A solver is any object with ``__call__(g, z0) -> Solution`` that solves ``z = g(z)`` (the
:class:`Solver` protocol); the library's solvers share :class:`SolverBase`.
"""

from __future__ import annotations

import inspect
from typing import Any

from .._options import registry_options, unknown_options
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
    unknown_options(SOLVERS[key], options, f"solver {key!r}")
    return SOLVERS[key](**options)


def options(name: str) -> dict[str, inspect.Parameter]:
    """The options of the solver ``name`` (keyword-only constructor parameters: annotation and
    default), where the training config, ``--set`` and the ablation grid take them from."""
    return registry_options(SOLVERS, name, "solver")


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
    "options",
]
