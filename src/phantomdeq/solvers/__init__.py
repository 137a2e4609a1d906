"""Forward and backward fixed-point solvers.

A solver is any object with ``__call__(g, z0) -> Solution`` that solves ``z = g(z)`` (the
:class:`Solver` protocol); the library's solvers share :class:`SolverBase`. The Krylov solvers
:class:`GMRES` and :class:`BiCGStab` solve only the linear IFT backward system (the
:class:`LinearSolver` protocol, ``solve_linear(op, rhs)``): they are registered in
``LINEAR_SOLVERS``, usable as ``IFT(solver=...)`` and ``grad.backward_solver``, refused as
forward solvers.
"""

from __future__ import annotations

import inspect
from typing import Any

from .._options import registry_options, unknown_options
from .anderson import Anderson
from .base import (
    InverseSolver,
    LinearSolver,
    Solution,
    Solver,
    SolverBase,
    SolveResult,
    UnrollingSolver,
    check_solver,
    compute_dtype,
)
from .bicgstab import BiCGStab
from .broyden import Broyden
from .fixed_point import FixedPoint
from .gmres import GMRES
from .inverse import LowRankInverse
from .linear import LinearSolverBase

#: the fixed-point solvers (forward and IFT backward)
SOLVERS: dict[str, type[SolverBase]] = {
    "fixed_point": FixedPoint,
    "anderson": Anderson,
    "broyden": Broyden,
}
#: the linear solvers of the IFT backward system only
LINEAR_SOLVERS: dict[str, type[LinearSolverBase]] = {
    "gmres": GMRES,
    "bicgstab": BiCGStab,
}
#: every solver an IFT backward accepts
BACKWARD_SOLVERS: dict[str, type[SolverBase] | type[LinearSolverBase]] = {
    **SOLVERS,
    **LINEAR_SOLVERS,
}


def from_name(name: str, **options: Any) -> SolverBase | LinearSolverBase:
    """Build a solver from its name (``fixed_point``, ``anderson``, ``broyden``, or the
    backward-only linear solvers ``gmres``, ``bicgstab``) and options.

    Unknown names or options raise ``ValueError`` naming the allowed ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"solver name must be a str, got {type(name).__name__} {name!r}")
    key = name.lower().replace("-", "_")
    if key in ("fixedpoint", "fp", "picard"):
        key = "fixed_point"
    if key not in BACKWARD_SOLVERS:
        raise ValueError(f"unknown solver {name!r}; allowed: {', '.join(BACKWARD_SOLVERS)}")
    unknown_options(BACKWARD_SOLVERS[key], options, f"solver {key!r}")
    return BACKWARD_SOLVERS[key](**options)


def options(name: str) -> dict[str, inspect.Parameter]:
    """The options of the solver ``name`` (keyword-only constructor parameters: annotation and
    default), where the training config, ``--set`` and the ablation grid take them from."""
    return registry_options(BACKWARD_SOLVERS, name, "solver")


__all__ = [
    "BACKWARD_SOLVERS",
    "GMRES",
    "LINEAR_SOLVERS",
    "SOLVERS",
    "Anderson",
    "BiCGStab",
    "Broyden",
    "FixedPoint",
    "InverseSolver",
    "LinearSolver",
    "LinearSolverBase",
    "LowRankInverse",
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
