"""``model.target``: any ``nn.Module`` from a factory, and how the trainer calls it.

**Building.** ``model.target: "package.module:factory"`` names a callable (a function or an
``nn.Module`` class) that returns the model; ``model.kwargs`` are its keyword arguments. The
module is imported as ``python -m`` would: from the working directory first, then the
installed packages and ``PYTHONPATH``. Besides ``model.kwargs`` the trainer passes every
argument that the factory's signature *names* among

* ``solver``, ``grad``, ``eval_solver``, ``correction`` -- built from the config's ``solver``,
  ``grad``, ``eval_solver`` and ``grad.correction`` sections (:data:`SECTION_ARGS`; a
  ``model.kwargs`` entry may not name them), and
* the fields of the data set's description (:class:`phantomdeq.data.DataInfo`:
  ``num_classes``, ``in_channels``, ``image_size``, ...; a ``model.kwargs`` entry of the same
  name wins).

The shipped MDEQ sizes are presets of it: ``model.name: mdeq_tiny`` is
``model.target: "phantomdeq.models:build_mdeq"`` with ``kwargs: {size: mdeq_tiny}`` (plus
``model.dropout`` and ``model.overrides``; :func:`preset_target`).

**Calling.** The trainer calls ``model(x, **options)``, passing only the options that
``forward`` declares by name (all of :data:`FORWARD_OPTIONS` when it takes ``**kwargs``):
``generator`` (a ``torch.Generator`` seeded per step, for dropout masks), ``mode``
(``"deq"``, or ``"unrolled"`` with ``unrolled_steps`` in the pre-training stage), ``jac_reg``
(a bool: add the Jacobian regulariser) and ``z0`` (the warm start). ``train.pretrain_steps``, ``train.jac_reg_weight``
and ``train.warm_start`` need the options they use (:meth:`ModelCall.require`).

**Output.** ``forward`` returns one of (:func:`as_output`)

* a tensor of predictions (an explicit model: no solver statistics, logged as NaN),
* ``(predictions, info)`` with ``info`` the :class:`phantomdeq.Solution` of its DEQ (or None):
  the trainer logs its steps, residual and convergence,
* an object with ``.logits`` and optionally ``.info``, ``.jac_loss`` (the Jacobian
  regulariser's value), ``.state_logits`` and ``.state_weights`` (fixed-point correction), as
  :class:`phantomdeq.models.MDEQOutput`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from phantomdeq.solvers.base import Solution

from .sections import ConfigError

__all__ = [
    "FORWARD_OPTIONS",
    "SECTION_ARGS",
    "ModelCall",
    "ModelOutput",
    "as_output",
    "build_target",
    "check_target",
    "import_target",
    "info_fields",
    "preset_target",
]

#: factory arguments built from the config's sections (``model.kwargs`` may not name them)
SECTION_ARGS = ("solver", "grad", "eval_solver", "correction")
#: keyword arguments of ``forward`` that the trainer passes when ``forward`` declares them
FORWARD_OPTIONS = ("mode", "unrolled_steps", "jac_reg", "generator", "z0")
#: the factory of the MDEQ presets (``model.name``)
MDEQ_FACTORY = "phantomdeq.models:build_mdeq"


def preset_target(name: str, dropout: float | None, overrides: dict[str, Any]) -> tuple[str, dict]:
    """``(target, kwargs)`` of the preset ``model.name: name`` with ``model.dropout`` and
    ``model.overrides``."""
    kwargs: dict[str, Any] = {"size": name, **overrides}
    if dropout is not None:
        kwargs["dropout"] = dropout
    return MDEQ_FACTORY, kwargs


def import_target(spec: str, key: str = "model.target") -> Callable[..., Any]:
    """The callable named by ``"package.module:attribute"`` (a dotted attribute path is
    allowed after the colon); a one-line :class:`ConfigError` naming ``key`` otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{key}: expected 'package.module:factory' (e.g. 'mypkg.cells:build'), got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m`: the working directory's modules first
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the import raises is reported in one line
        raise ConfigError(
            f"{key}: cannot import module {module_name!r} of {spec!r} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: {module_name!r} has no attribute {attr!r} ({spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: accept any keywords
        return None


def _named(sig: inspect.Signature | None) -> set[str] | None:
    """The keyword-passable parameter names, or None when any keyword is accepted."""
    if sig is None:
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n for n, p in sig.parameters.items() if p.kind in kinds}


def _takes_any_keyword(sig: inspect.Signature | None) -> bool:
    return sig is None or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )


def check_target(spec: str, kwargs: dict[str, Any], prefix: str = "model") -> None:
    """Config-time checks of ``model.target`` / ``model.kwargs``: the factory imports and is
    callable, and every ``kwargs`` key is one of its parameters and not a section argument."""
    fn = import_target(spec, f"{prefix}.target")
    sig = _signature(fn)
    named = _named(sig) or set()
    for key in kwargs:
        if key in SECTION_ARGS:
            section = "grad.correction" if key == "correction" else key
            raise ConfigError(
                f"{prefix}.kwargs.{key}: is built by the trainer from the {section} section; "
                f"set it there"
            )
        if key not in named and not _takes_any_keyword(sig):
            params = ", ".join(sorted(named)) or "none"
            raise ConfigError(
                f"{prefix}.kwargs.{key}: not a parameter of {prefix}.target {spec!r}; "
                f"its parameters: {params}"
            )


def info_fields(info: Any) -> dict[str, Any]:
    """The fields of a data set description (a dataclass such as DataInfo, a mapping or an
    object) as a mapping."""
    if info is None:
        return {}
    if isinstance(info, dict):
        return dict(info)
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        return {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    return {k: v for k, v in vars(info).items() if not k.startswith("_")}


def build_target(
    spec: str,
    kwargs: dict[str, Any],
    *,
    sections: dict[str, Any],
    info: Any = None,
    key: str = "model.target",
) -> nn.Module:
    """Call the factory ``spec`` with ``kwargs`` plus the ``sections`` objects and ``info``
    fields its signature names (see the module docstring); a one-line :class:`ConfigError`
    naming ``key`` when it cannot be called with them, raises ``TypeError`` / ``ValueError``
    or does not return an ``nn.Module``."""
    fn = import_target(spec, key)
    sig = _signature(fn)
    named = _named(sig)
    offered = {**info_fields(info), **sections}
    args = {k: v for k, v in offered.items() if named is not None and k in named}
    args.update(kwargs)
    if sig is not None:
        try:
            sig.bind(**args)
        except TypeError as exc:
            raise ConfigError(
                f"{key}: cannot call {spec!r} with the keyword arguments {sorted(args)} "
                f"({exc}); give the missing ones in model.kwargs"
            ) from None
    try:
        model = fn(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{key}: {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


@dataclass
class ModelOutput:
    """A forward pass as the trainer reads it (:func:`as_output`).

    Attributes:
        prediction: what the task scores (class scores, token logits).
        info: the DEQ solve's :class:`phantomdeq.Solution`, or None (no solver statistics).
        jac_loss: the Jacobian regulariser's value when it was asked for, else None.
        state_predictions: under fixed-point correction, the predictions of every supervised
            state, earliest first (the last is ``prediction``); else None.
        state_weights: their loss weights (None without correction).
    """

    prediction: Tensor
    info: Solution | None = None
    jac_loss: Tensor | None = None
    state_predictions: list[Tensor] | None = None
    state_weights: list[float] | None = None


def as_output(out: Any) -> ModelOutput:
    """Read a model's return value (a tensor, ``(prediction, info)`` or an object with
    ``.logits``); anything else is a :class:`ConfigError` naming ``model.target``."""
    if isinstance(out, Tensor):
        return ModelOutput(out)
    if (
        isinstance(out, tuple | list)
        and len(out) == 2
        and isinstance(out[0], Tensor)
        and (out[1] is None or isinstance(out[1], Solution))
    ):
        return ModelOutput(out[0], out[1])
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return ModelOutput(
            logits,
            getattr(out, "info", None),
            getattr(out, "jac_loss", None),
            getattr(out, "state_logits", None),
            getattr(out, "state_weights", None),
        )
    what = type(out).__name__
    if isinstance(out, tuple | list):
        what += " of (" + ", ".join(type(v).__name__ for v in out) + ")"
    raise ConfigError(
        f"model.target: the model's forward returned a {what}; the trainer needs a Tensor of "
        "predictions, a pair (predictions, info) with info a phantomdeq.Solution or None, or "
        "an object with .logits"
    )


class ModelCall:
    """Calls a model as the trainer does: ``model(x, **options)`` with the options of
    :data:`FORWARD_OPTIONS` that ``net.forward`` declares (all of them when it takes
    ``**kwargs``), the result read by :func:`as_output`. ``net`` is the bare model (not its DDP
    wrapper)."""

    def __init__(self, net: nn.Module) -> None:
        sig = _signature(net.forward)
        named = set(FORWARD_OPTIONS) if _takes_any_keyword(sig) else _named(sig) or set()
        self.accepts = frozenset(o for o in FORWARD_OPTIONS if o in named)

    def __call__(self, model: nn.Module, x: Any, **options: Any) -> ModelOutput:
        return as_output(model(x, **{k: v for k, v in options.items() if k in self.accepts}))

    def require(self, options: tuple[str, ...], key: str, what: str, target: str) -> None:
        """A :class:`ConfigError` naming ``key`` when ``forward`` lacks one of ``options``."""
        missing = [o for o in options if o not in self.accepts]
        if missing:
            raise ConfigError(
                f"{key}: {what} needs the model's forward to take "
                f"{' and '.join(missing)} (model {target!r} does not)"
            )
