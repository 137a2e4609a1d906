"""phantomdeq: deep equilibrium models trained with phantom gradients.

Public API::

    import phantomdeq as pdq
    deq = pdq.DEQ(f, solver=pdq.solvers.Anderson(max_iter=30, tol=1e-4),
                  grad=pdq.grad.UPG(k=5, lam=0.5))
    z, info = deq(z0, x)

A solver is any object with ``__call__(g, z0) -> Solution`` (:class:`Solver`); the library's
solvers share :class:`SolverBase`. Submodules: ``solvers``, ``grad``, ``diagnostics``, ``nn``,
``models``, ``precision``.
"""

from . import diagnostics, grad, models, nn, precision, solvers
from .deq import DEQ
from .errors import CorrectionError, DEQError
from .grad import (
    BPTT,
    IFT,
    NPG,
    SHINE,
    UPG,
    Correction,
    GradientEstimator,
    OneStep,
    corrected_loss,
)
from .precision import AutocastCell
from .solvers import (
    GMRES,
    Anderson,
    BiCGStab,
    Broyden,
    FixedPoint,
    Solution,
    Solver,
    SolverBase,
    SolveResult,
    UnrollingSolver,
)

__version__ = "0.1.0"

__all__ = [
    "BPTT",
    "DEQ",
    "IFT",
    "GMRES",
    "NPG",
    "SHINE",
    "UPG",
    "Anderson",
    "AutocastCell",
    "BiCGStab",
    "Broyden",
    "Correction",
    "CorrectionError",
    "DEQError",
    "FixedPoint",
    "GradientEstimator",
    "OneStep",
    "Solution",
    "SolveResult",
    "Solver",
    "SolverBase",
    "UnrollingSolver",
    "corrected_loss",
    "diagnostics",
    "grad",
    "models",
    "nn",
    "precision",
    "solvers",
]
