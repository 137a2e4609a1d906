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

from .._options import keyword_options, registry_options, unknown_options
from .._registry import check_registration, defines
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
BUILTIN_NAMES = frozenset({*BACKWARD_SOLVERS, "fixedpoint", "fp", "picard"})
"""The library's own solver names and their aliases (:func:`register` refuses them)."""


def register(name: str, cls: type | None = None) -> Any:
    """Register a user solver class under ``name`` (a lower-case identifier), as
    ``register("mysolver", MySolver)`` or as the decorator ``@register("mysolver")``; returns
    the class.

    The class declares its options as keyword-only constructor parameters (with annotations
    and defaults) and follows a solver protocol: its instances are called ``solver(g, z0) ->
    Solution`` (:class:`Solver`: a forward solver, also usable as the IFT backward solver), or
    have ``solve_linear(op, rhs)`` only (:class:`LinearSolver`: the IFT backward system only).
    Then ``from_name(name, **options)``, ``options(name)``, the training config's
    ``solver.name``/``grad.backward_solver.name`` (with its options as keys of that section,
    typed by their annotations and checked by building the class) and ``--set`` accept it.
    The config must import the registering module first: its ``plugins`` list
    (``plugins: [mypkg.solvers]``). A built-in name, a name taken by another class, a
    non-class, a class without keyword-only options or outside both protocols is refused
    (``ValueError``/``TypeError`` naming the argument).
    """
    if cls is None:
        return lambda c: register(name, c)
    key = check_registration(BACKWARD_SOLVERS, BUILTIN_NAMES, name, cls, "solvers")
    if defines(cls, "__call__"):
        SOLVERS[key] = cls  # type: ignore[assignment]
    elif defines(cls, "solve_linear"):
        LINEAR_SOLVERS[key] = cls  # type: ignore[assignment]
    else:
        raise TypeError(
            f"phantomdeq.solvers.register: cls {cls.__name__} follows no solver protocol: define "
            "__call__(self, g, z0) -> Solution (a fixed-point solver, e.g. a SolverBase "
            "subclass) or solve_linear(self, op, rhs) (a linear backward solver)"
        )
    BACKWARD_SOLVERS[key] = cls  # type: ignore[assignment]
    return cls


def unregister(name: str) -> None:
    """Remove the user solver ``name`` (``KeyError`` when not registered; built-ins stay)."""
    if name in BUILTIN_NAMES:
        raise ValueError(f"phantomdeq.solvers.unregister: {name!r} is a built-in solver")
    del BACKWARD_SOLVERS[name]
    SOLVERS.pop(name, None)
    LINEAR_SOLVERS.pop(name, None)


def from_name(name: str, **options: Any) -> SolverBase | LinearSolverBase:
    """Build a solver from its name (``fixed_point``, ``anderson``, ``broyden``, or the
    backward-only linear solvers ``gmres``, ``bicgstab``) and options.

    Unknown names or options raise ``ValueError`` naming the allowed ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"solver name must be a str, got {type(name).__name__} {name!r}")
    key = name if name in BACKWARD_SOLVERS else name.lower().replace("-", "_")
    if key in ("fixedpoint", "fp", "picard"):
        key = "fixed_point"
    if key not in BACKWARD_SOLVERS:
        raise ValueError(f"unknown solver {name!r}; allowed: {', '.join(BACKWARD_SOLVERS)}")
    unknown_options(BACKWARD_SOLVERS[key], options, f"solver {key!r}")
    return BACKWARD_SOLVERS[key](**options)


def with_options(solver: Any, **overrides: Any) -> Any:
    """A new solver of ``solver``'s class with its options and ``overrides`` (the keyword
    pass-through of TorchDEQ's ``solver_kwargs``): ``with_options(Anderson(m=5), max_iter=50)``
    is ``Anderson(m=5, max_iter=50, ...)``. The keys are checked against the class's options
    (keyword-only constructor parameters; ``ValueError`` naming the unknown ones and the
    allowed), the values by the class. The current values are read from the solver's
    attributes of the same names (as the library's solvers store them); a class that does not
    is a ``TypeError`` naming the option."""
    cls = type(solver)
    unknown_options(cls, overrides, f"solver {cls.__name__}")
    current: dict[str, Any] = {}
    for key in keyword_options(cls):
        if key in overrides:
            continue
        if not hasattr(solver, key):
            raise TypeError(
                f"solver {cls.__name__}: cannot override its options: it stores no attribute "
                f"{key!r} for its option {key!r}; build a new solver instead"
            )
        current[key] = getattr(solver, key)
    return cls(**current, **overrides)


def options(name: str) -> dict[str, inspect.Parameter]:
    """The options of the solver ``name`` (keyword-only constructor parameters: annotation and
    default), where the training config, ``--set`` and the ablation grid take them from."""
    return registry_options(BACKWARD_SOLVERS, name, "solver")


__all__ = [
    "BACKWARD_SOLVERS",
    "BUILTIN_NAMES",
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
    "register",
    "unregister",
    "with_options",
]
