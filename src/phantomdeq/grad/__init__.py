"""Gradient estimators for the DEQ output: exact (IFT), phantom (UPG, NPG), the forward
inverse estimate (SHINE) and references."""

from __future__ import annotations

import inspect
from typing import Any

from .._options import registry_options, unknown_options
from .._registry import check_registration
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

BUILTIN_NAMES = frozenset(ESTIMATORS)
"""The library's own estimator names (:func:`register` refuses them)."""


def register(name: str, cls: type | None = None) -> Any:
    """Register a user gradient estimator class under ``name`` (a lower-case identifier), as
    ``register("myest", MyEstimator)`` or as the decorator ``@register("myest")``; returns the
    class.

    The class subclasses :class:`GradientEstimator` (the protocol a :class:`~phantomdeq.DEQ`
    asks: :meth:`~GradientEstimator.attach`, or :meth:`~GradientEstimator.equilibrium` for
    another need) and declares its options as keyword-only constructor parameters (with
    annotations and defaults). Then ``from_name(name, **options)``, ``options(name)``, the
    training config's ``grad.name`` (its options as keys of ``grad``, typed by their
    annotations and checked by building the class; an option named ``solver`` is the
    ``grad.backward_solver`` section) and ``--set`` accept it. The config must import the
    registering module first: its ``plugins`` list (``plugins: [mypkg.estimators]``). A
    built-in name, a name taken by another class, a non-class, a class without keyword-only
    options or not a ``GradientEstimator`` is refused (``ValueError``/``TypeError`` naming the
    argument).
    """
    if cls is None:
        return lambda c: register(name, c)
    key = check_registration(ESTIMATORS, BUILTIN_NAMES, name, cls, "grad")
    if not issubclass(cls, GradientEstimator):  # type: ignore[arg-type]
        raise TypeError(
            f"phantomdeq.grad.register: cls {cls.__name__} must subclass "  # type: ignore[union-attr]
            "phantomdeq.grad.GradientEstimator (override attach(f, z_star, *inputs, info) or "
            "equilibrium(fp))"
        )
    ESTIMATORS[key] = cls
    return cls


def unregister(name: str) -> None:
    """Remove the user estimator ``name`` (``KeyError`` when not registered; built-ins stay)."""
    if name in BUILTIN_NAMES:
        raise ValueError(f"phantomdeq.grad.unregister: {name!r} is a built-in estimator")
    del ESTIMATORS[name]


def from_name(name: str, **options: Any) -> GradientEstimator:
    """Build an estimator from its name (``ift``, ``upg``, ``npg``, ``onestep``, ``bptt``,
    ``shine``)."""
    key = name if name in ESTIMATORS else name.lower().replace("-", "").replace("_", "")
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
    "BUILTIN_NAMES",
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
    "register",
    "unregister",
]
