"""Models built on :class:`phantomdeq.DEQ`: the multiscale DEQ (MDEQ) and its configurations."""

from __future__ import annotations

from phantomdeq.grad.base import GradientEstimator
from phantomdeq.grad.correction import Correction
from phantomdeq.solvers.base import Solver

from .mdeq import MDEQ, MDEQ_CONFIG_NAMES, MDEQConfig, MDEQOutput, mdeq_config, with_overrides

__all__ = [
    "MDEQ",
    "MDEQ_CONFIG_NAMES",
    "MDEQConfig",
    "MDEQOutput",
    "build_mdeq",
    "build_model",
    "mdeq_config",
]


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    solver: Solver,
    grad: GradientEstimator,
    eval_solver: Solver | None = None,
    correction: Correction | None = None,
) -> MDEQ:
    """Build a named model (one of :data:`MDEQ_CONFIG_NAMES`) around ``pdq.DEQ(solver, grad)``."""
    if not isinstance(name, str):
        raise TypeError(f"build_model: name must be a str, got {type(name).__name__}")
    if name not in MDEQ_CONFIG_NAMES:
        raise ValueError(
            f"build_model: unknown name {name!r}; allowed names: {', '.join(MDEQ_CONFIG_NAMES)}"
        )
    return MDEQ(
        mdeq_config(name),
        num_classes=num_classes,
        in_channels=in_channels,
        solver=solver,
        grad=grad,
        eval_solver=eval_solver,
        correction=correction,
    )


def build_mdeq(
    size: str = "mdeq_tiny",
    *,
    num_classes: int,
    in_channels: int,
    solver: Solver,
    grad: GradientEstimator,
    eval_solver: Solver | None = None,
    correction: Correction | None = None,
    **fields: object,
) -> MDEQ:
    """An MDEQ of the named configuration ``size`` (one of :data:`MDEQ_CONFIG_NAMES`) with
    some :class:`MDEQConfig` ``fields`` replaced (lists given for tuple fields are converted):
    the factory behind the trainer's ``model.name`` presets
    (``model.target: "phantomdeq.models:build_mdeq"``)."""
    if not fields:
        return build_model(
            size,
            num_classes=num_classes,
            in_channels=in_channels,
            solver=solver,
            grad=grad,
            eval_solver=eval_solver,
            correction=correction,
        )
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return MDEQ(
        with_overrides(mdeq_config(size), **changes),
        num_classes=num_classes,
        in_channels=in_channels,
        solver=solver,
        grad=grad,
        eval_solver=eval_solver,
        correction=correction,
    )
