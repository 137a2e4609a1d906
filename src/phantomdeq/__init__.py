"""phantomdeq: deep equilibrium models trained with phantom gradients.

Public API::

    import phantomdeq as pdq
    deq = pdq.DEQ(f, solver=pdq.solvers.Anderson(max_iter=30, tol=1e-4),
                  grad=pdq.grad.UPG(k=5, lam=0.5))
    z, info = deq(z0, x)
"""

from . import diagnostics, grad, solvers
from .deq import DEQ
from .errors import DEQError
from .grad import BPTT, IFT, NPG, UPG, GradientEstimator, OneStep
from .solvers import Anderson, Broyden, FixedPoint, Solution, Solver

__version__ = "0.1.0"

__all__ = [
    "BPTT",
    "DEQ",
    "DEQError",
    "IFT",
    "NPG",
    "UPG",
    "Anderson",
    "Broyden",
    "FixedPoint",
    "GradientEstimator",
    "OneStep",
    "Solution",
    "Solver",
    "diagnostics",
    "grad",
    "solvers",
]
