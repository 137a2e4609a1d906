"""Forward and backward fixed-point solvers: ``solver(g, z0) -> Solution`` solves ``z = g(z)``."""

from __future__ import annotations

from typing import Any

from .anderson import Anderson
from .base import Solution, Solver
from .broyden import Broyden
from .fixed_point import FixedPoint

SOLVERS: dict[str, type[Solver]] = {
    "fixed_point": FixedPoint,
    "anderson": Anderson,
    "broyden": Broyden,
}


def from_name(name: str, **options: Any) -> Solver:
    """Build a solver from its name (``fixed_point``, ``anderson``, ``broyden``) and options.

    Unknown names or options raise ``ValueError`` naming the allowed ones.
    """
    key = name.lower().replace("-", "_")
    if key in ("fixedpoint", "fp", "picard"):
        key = "fixed_point"
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; allowed: {', '.join(SOLVERS)}")
    cls = SOLVERS[key]
    import inspect

    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for solver {key!r}; allowed: {', '.join(allowed)}"
        )
    return cls(**options)


__all__ = ["Anderson", "Broyden", "FixedPoint", "SOLVERS", "Solution", "Solver", "from_name"]
