"""Everything a run builds from its config: solvers, the gradient estimator, the model (and how
the trainer calls it), the device, the optimiser and its learning-rate schedule. Shared by
``phantomdeq train`` and ``phantomdeq eval`` (the data sets: :mod:`.data`).

``model.target``: any ``nn.Module`` from a factory, and how the trainer calls it.

**Building.** ``model.target: "package.module:factory"`` names a callable (a function or an
``nn.Module`` class) that returns the model; ``model.kwargs`` are its keyword arguments. The
module is imported as ``python -m`` would: from the working directory first, then the
installed packages and ``PYTHONPATH``. Besides ``model.kwargs`` the trainer passes every
argument that the factory's signature *names* among

* ``solver``, ``grad``, ``eval_solver``, ``correction`` -- built from the config's ``solver``,
  ``grad``, ``eval_solver`` and ``grad.correction`` sections (:data:`~.sections.SECTION_ARGS`; a
  ``model.kwargs`` entry may not name them), and
* the fields of the data set's description (:class:`phantomdeq.data.DataInfo`:
  ``num_classes``, ``in_channels``, ``image_size``, ...; a ``model.kwargs`` entry of the same
  name wins).

The shipped MDEQ sizes are presets of it: ``model.name: mdeq_tiny`` is
``model.target: "phantomdeq.models:build_mdeq"`` with ``kwargs: {size: mdeq_tiny}`` (plus
``model.dropout`` and ``model.overrides``; :func:`~.sections.preset_target`).

**Calling.** The trainer calls ``model(x, **options)``, passing only the options that
``forward`` declares by name (all of :data:`FORWARD_OPTIONS` when it takes ``**kwargs``):
``generator`` (a ``torch.Generator`` seeded per step, for dropout masks), ``mode``
(``"deq"``, or ``"unrolled"`` with ``unrolled_steps`` in the pre-training stage), ``jac_reg``
(a bool: add the Jacobian regulariser) and ``z0`` (the warm start). ``train.pretrain_steps``,
``train.jac_reg_weight`` and ``train.warm_start`` need the options they use (:meth:`ModelCall.require`).

**Output.** ``forward`` returns one of (:func:`as_output`)

* a tensor of predictions (an explicit model: no solver statistics, logged as NaN),
* ``(predictions, info)`` with ``info`` the :class:`phantomdeq.Solution` of its DEQ (or None):
  the trainer logs its steps, residual and convergence,
* an object with ``.logits`` and optionally ``.info``, ``.jac_loss`` (the Jacobian
  regulariser's value), ``.state_logits`` and ``.state_weights`` (fixed-point correction), as
  :class:`phantomdeq.models.MDEQOutput`.

``train.compile: true``: the model through ``torch.compile``, in place.

Compiled in place (:meth:`torch.nn.Module.compile`), so parameter names, ``state_dict`` keys and
checkpoints are those of the eager model. The cell of every :class:`~phantomdeq.DEQ` inside is
compiled on its own as well: a solve with a convergence test (``tol > 0``) runs its loop
eagerly (see :meth:`phantomdeq.SolverBase.__call__`), and there the cell stays compiled; a
fixed-budget solve (``tol = 0``) is traced whole into the model's graph.

The per-iteration learning-rate schedule: linear warm-up, then cosine decay or constant.

When a resumed run changes ``train.epochs`` (extending a finished run), the schedule is
re-planned over the new total from the current step: ``lr(t)`` is the new plan's value at the
current step ``t`` (:func:`replan_note` says so on resume). For a cosine schedule that continues
as the remaining part of a run planned for the new length; continuing at the old plan's end value
would train at ``min_lr`` (0 by default), i.e. not at all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from phantomdeq.deq import DEQ
from phantomdeq.solvers.base import Solution

from .config import (
    Config,
    ConfigError,
    GradConfig,
    OptimConfig,
    SolverConfig,
    SolverSection,
    TrainConfig,
)
from .distributed import DistInfo
from .sections import import_target, keyword_names, takes_any_keyword, target_signature

__all__ = [
    "check_model",
    "FORWARD_OPTIONS",
    "LRSchedule",
    "ModelCall",
    "ModelOutput",
    "as_output",
    "build_correction",
    "build_grad",
    "build_model",
    "build_solver",
    "build_target",
    "compile_model",
    "info_fields",
    "make_optimizer",
    "replan_note",
    "resolve_device",
    "weight_decay_groups",
]


# --- the solvers, the estimator, the model and the optimiser ----------------------------------


def build_solver(cfg: SolverConfig) -> Any:
    """``pdq.solvers.from_name`` for a :class:`SolverConfig`."""
    import phantomdeq.solvers as solvers

    return solvers.from_name(cfg.name, **cfg.kwargs())


def build_grad(cfg: GradConfig) -> Any:
    """``pdq.grad.from_name`` for a :class:`GradConfig` with the estimator's own options (a
    solver option, IFT's, gets its solver section built)."""
    import phantomdeq.grad as grad

    options = {
        k: build_solver(v) if isinstance(v, SolverSection) else v for k, v in cfg.kwargs().items()
    }
    return grad.from_name(cfg.name, **options)


def build_correction(cfg: GradConfig) -> Any:
    """The fixed-point correction of ``grad.correction`` (None with ``states: 1``, the plain
    estimator)."""
    from phantomdeq.grad import Correction

    c = cfg.correction
    return Correction(states=c.states, gamma=c.gamma, mode=c.mode) if c.states > 1 else None


def build_model(
    cfg: Config,
    num_classes: int | None = None,
    in_channels: int | None = None,
    *,
    info: Any = None,
) -> nn.Module:
    """The model of ``cfg.model`` (a preset or ``model.target``; see
    :mod:`.build`), given the solvers and estimator of the config's sections and the
    data set's description ``info`` (:class:`phantomdeq.data.DataInfo`; ``num_classes`` and
    ``in_channels``, when given, replace its fields)."""

    fields = info_fields(info)
    if num_classes is not None:
        fields["num_classes"] = num_classes
    if in_channels is not None:
        fields["in_channels"] = in_channels
    sections = {
        "solver": build_solver(cfg.solver),
        "grad": build_grad(cfg.grad),
        "eval_solver": None if cfg.eval_solver is None else build_solver(cfg.eval_solver),
        "correction": build_correction(cfg.grad),
    }
    target, kwargs = cfg.model.resolved()
    key = "model.target" if cfg.model.target is not None else "model"
    return build_target(target, kwargs, sections=sections, info=fields, key=key)


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
        if name == "cuda":
            return torch.device(
                "cuda", dist_info.local_rank if dist_info.enabled else torch.cuda.current_device()
            )
    return torch.device(name)


#: modules whose parameters are never decayed by ``optim.name: adamw``
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in two optimiser parameter groups: those decayed
    with ``weight_decay`` (the weights of linear, convolution and embedding layers: parameters
    with two or more dimensions) and those not decayed (``weight_decay`` 0): biases, every
    parameter of a normalisation layer (:data:`NORM_LAYERS`) and every other 0-d or 1-d
    parameter. A parameter shared by several modules is listed once; an empty group is
    left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        norm = isinstance(module, NORM_LAYERS)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            bias = name == "bias" or name.endswith("_bias") or name.startswith("bias")
            (no_decay if norm or bias or p.dim() < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW (:func:`weight_decay_groups`) over the trainable parameters of
    ``model`` (``optim.*`` options)."""
    if o.name == "adamw":
        return torch.optim.AdamW(
            weight_decay_groups(model, o.weight_decay),
            lr=o.lr,
            betas=(o.betas[0], o.betas[1]),
            eps=o.eps,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
        )
    return torch.optim.Adam(
        params, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, weight_decay=o.weight_decay
    )


# --- model.target: calling a factory, and calling the model -----------------------------------

#: keyword arguments of ``forward`` that the trainer passes when ``forward`` declares them
FORWARD_OPTIONS = ("mode", "unrolled_steps", "jac_reg", "generator", "z0")


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
    sig = target_signature(fn)
    named = keyword_names(sig)
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
        sig = target_signature(net.forward)
        named = set(FORWARD_OPTIONS) if takes_any_keyword(sig) else keyword_names(sig) or set()
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


# --- train.compile ----------------------------------------------------------------------------


def compile_model(net: nn.Module, **options: Any) -> nn.Module:
    """Compile ``net`` and the cells of its DEQs in place (``options`` go to
    ``torch.compile``, e.g. ``backend``); returns ``net``."""
    for module in net.modules():
        if isinstance(module, DEQ) and isinstance(module.f, nn.Module):
            module.f.compile(**options)
    net.compile(**options)
    return net


# --- the learning-rate schedule ---------------------------------------------------------------


class LRSchedule:
    """Per-iteration learning rate: linear warm-up then cosine decay (or constant).

    ``lr(t) = lr * (t + 1) / warmup`` for ``t < warmup``, then
    ``min_lr + (lr - min_lr) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        kind: str = "cosine",
    ) -> None:
        if kind not in ("cosine", "constant"):
            raise ValueError(f"LRSchedule: kind must be 'cosine' or 'constant', got {kind!r}")
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.kind = kind
        self.last_step = -1

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max(step - self.warmup_steps, 0), span) / span
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def set_step(self, step: int) -> float:
        """Set the learning rate of every parameter group for iteration ``step``."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr": self.min_lr,
            "kind": self.kind,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])


def replan_note(
    optim: OptimConfig, steps_per_epoch: int, *, old_epochs: int, new_epochs: int, step: int
) -> str:
    """What re-planning the schedule from ``old_epochs`` to ``new_epochs`` means at ``step``
    (the number of optimiser steps done): the learning rate the next step runs at under each
    plan and where the new plan ends."""
    total = steps_per_epoch * new_epochs
    if optim.schedule == "constant":
        return f"the learning rate stays at {optim.lr:g} (constant schedule)"
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr)

    def plan(epochs: int) -> LRSchedule:
        return LRSchedule(
            opt,
            base_lr=optim.lr,
            total_steps=steps_per_epoch * epochs,
            warmup_steps=optim.warmup_steps,
            min_lr=optim.min_lr,
            kind=optim.schedule,
        )

    return (
        f"the cosine learning-rate schedule is re-planned over {new_epochs} epochs ({total} "
        f"steps): step {step + 1} runs at lr {plan(new_epochs).lr_at(step):.3g} (the "
        f"{old_epochs}-epoch plan had {plan(old_epochs).lr_at(step):.3g}) and it decays to "
        f"optim.min_lr = {optim.min_lr:g} at step {total}"
    )


def check_model(train: TrainConfig, target: str, call: ModelCall, model: nn.Module) -> None:
    """What the config's training options (``train``, its train section) need from the model
    built from ``target`` (a one-line error naming the option): an unrolled mode for
    pre-training, the Jacobian regulariser, a warm start, a DEQ inside for the gradient
    monitor and the warm start."""
    if train.pretrain_steps > 0:
        call.require(
            ("mode", "unrolled_steps"), "train.pretrain_steps", "unrolled pre-training", target
        )
    if train.jac_reg_weight > 0:
        call.require(("jac_reg",), "train.jac_reg_weight", "the regulariser", target)
    if train.warm_start:
        call.require(("z0",), "train.warm_start", "a warm start", target)
    if train.monitor_every > 0 or train.warm_start:
        from .monitor import find_deq

        try:
            find_deq(model)
        except ValueError:
            key = "train.monitor_every" if train.monitor_every > 0 else "train.warm_start"
            raise ConfigError(
                f"{key}: needs a phantomdeq.DEQ inside the model; model {target!r} has none"
            ) from None
