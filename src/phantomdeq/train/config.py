"""Typed training configuration, parsed once from YAML at the command-line edge.

A config file is a mapping with the sections of :class:`Config` (``model``, ``data``,
``solver``, ``eval_solver``, ``grad``, ``optim``, ``train``, ``log``). Every section is a
dataclass; unknown keys and values of the wrong type are errors (:class:`ConfigError`) that name
the dotted key and the expected type or the allowed values. ``--set key=value`` overrides are
applied to the raw mapping before parsing, so they are checked the same way.

New options are added by adding a field with a default to a section dataclass (for example
``train.monitor_every: int = 0`` for the gradient-quality monitor); the parser, the
``--set`` overrides and the saved ``config.yaml`` pick it up without further changes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from phantomdeq import grad as grad_estimators
from phantomdeq import solvers as solver_classes
from phantomdeq.data import DATASET_CHANNELS

from .atomic import atomic_write
from .precision import check_precision

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "GradConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "SolverConfig",
    "TrainConfig",
    "apply_overrides",
    "config_differences",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
    "resolve_data_root",
]


class ConfigError(ValueError):
    """Invalid configuration: the message names the dotted key and what is allowed."""


SolverName = Literal["fixed_point", "anderson", "broyden"]

#: the options of :class:`SolverConfig` that belong to one solver class only
SOLVER_OPTIONS: dict[str, tuple[str, ...]] = {
    "anderson": ("m", "beta", "lam"),
    "fixed_point": ("damping",),
    "broyden": ("memory",),
}


def _construct(build: Any, options: dict[str, Any], prefix: str) -> None:
    """Build an object from ``options`` (the library class validates them); a refusal becomes a
    :class:`ConfigError` naming the dotted key of the offending option -- found by building
    with that option alone -- and keeping the class's message (what is allowed)."""
    try:
        build(**options)
    except (TypeError, ValueError) as exc:
        culprits = []
        for key, value in options.items():
            try:
                build(**{key: value})
            except (TypeError, ValueError):
                culprits.append(key)
        keys = ", ".join(f"{prefix}.{k}" for k in (culprits or options))
        message = " ".join(str(exc).split())
        raise ConfigError(f"{keys}: {message}") from exc


GradName = Literal["ift", "upg", "npg", "onestep", "bptt"]
DatasetName = Literal["digits", "mnist", "cifar10", "imagefolder"]


@dataclass
class SolverConfig:
    """A forward (or IFT backward) fixed-point solver, built with ``pdq.solvers.from_name``.

    ``m``, ``beta`` and ``lam`` apply to Anderson acceleration, ``damping`` to the fixed-point
    iteration and ``memory`` to Broyden's method; each is passed only to the solver it belongs to.
    """

    name: SolverName = "anderson"
    max_iter: int = 22
    tol: float = 1e-4
    stop: Literal["rel", "abs"] = "rel"
    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4
    damping: float = 1.0
    memory: int | None = None

    def validate(self, prefix: str) -> None:
        _positive_int(self.max_iter, f"{prefix}.max_iter")
        _nonneg_float(self.tol, f"{prefix}.tol")
        _positive_int(self.m, f"{prefix}.m")
        if not 0.0 < self.damping <= 1.0:
            raise ConfigError(f"{prefix}.damping: must be in (0, 1], got {self.damping!r}")
        if self.memory is not None:
            _positive_int(self.memory, f"{prefix}.memory")
        # the solver classes own their option checks (beta, lam, ...): build every solver that
        # has options here, so that no value in the config is invalid, used or not
        common = {"max_iter": self.max_iter, "tol": self.tol, "stop": self.stop}
        for name, keys in SOLVER_OPTIONS.items():
            options = {**common, **{k: getattr(self, k) for k in keys}}

            def build(name: str = name, **kw: Any) -> Any:
                return solver_classes.from_name(name, **kw)

            _construct(build, options, prefix)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pdq.solvers.from_name(self.name, **kwargs)``."""
        out: dict[str, Any] = {"max_iter": self.max_iter, "tol": self.tol, "stop": self.stop}
        if self.name == "anderson":
            out.update(m=self.m, beta=self.beta, lam=self.lam)
        elif self.name == "fixed_point":
            out.update(damping=self.damping)
        elif self.name == "broyden":
            out.update(memory=self.memory)
        return out


def _ift_backward_default() -> SolverConfig:
    return SolverConfig(name="fixed_point", max_iter=30, tol=1e-6)


@dataclass
class GradConfig:
    """The gradient estimator (paper Sec. 2): ``ift`` (eq. 4), ``upg`` (unrolled phantom
    gradient A^unr_{k,λ}, eq. 17), ``npg`` (Neumann phantom gradient A^neu_{k,λ}, eq. 18),
    ``onestep`` (= UPG(1, 1)) or ``bptt``. ``k`` and ``lam`` apply to upg/npg, ``checkpoint`` to
    upg, ``backward_solver`` to ift."""

    name: GradName = "upg"
    k: int = 5
    lam: float = 0.5
    checkpoint: bool = False
    backward_solver: SolverConfig = field(default_factory=_ift_backward_default)

    def validate(self, prefix: str) -> None:
        _positive_int(self.k, f"{prefix}.k")
        if not 0.0 < self.lam <= 1.0:
            raise ConfigError(f"{prefix}.lam: must be in (0, 1], got {self.lam!r}")
        self.backward_solver.validate(f"{prefix}.backward_solver")
        # the estimator classes own their option checks: build the phantom gradients
        for name, options in (
            ("upg", {"k": self.k, "lam": self.lam, "checkpoint": self.checkpoint}),
            ("npg", {"k": self.k, "lam": self.lam}),
        ):

            def build(name: str = name, **kw: Any) -> Any:
                return grad_estimators.from_name(name, **kw)

            _construct(build, options, prefix)


@dataclass
class ModelConfig:
    """Which model ``phantomdeq.models.build_model`` builds (``mdeq_tiny``, ``mdeq_cifar10m``,
    ``mdeq_imagenet18m``). ``dropout`` replaces the configuration's variational-dropout rate
    (null keeps it); ``overrides`` replaces other architecture fields (e.g. ``channels``)."""

    name: str = "mdeq_tiny"
    dropout: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str) -> None:
        if not self.name:
            raise ConfigError(f"{prefix}.name: must be a non-empty model name (e.g. 'mdeq_tiny')")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout: must be in [0, 1) or null, got {self.dropout!r}")


@dataclass
class DataConfig:
    """Data set and batching. ``batch_size`` is the *global* batch (split over DDP ranks).

    ``root`` may be relative: it is looked up from the working directory, the config file's
    directory and the repository root (see :func:`resolve_data_root`). ``mean``/``std`` are the
    per-channel normalisation constants (one entry per channel: 1 for digits/MNIST, 3 for
    CIFAR-10/image folders; null keeps the data set's own: digits' train statistics, the
    standard MNIST/CIFAR-10 constants, the ImageNet ones for image folders).

    Augmentation: for the in-memory sets (digits, MNIST, CIFAR-10) ``augment`` turns on the
    batched random crop (``crop_padding`` pixels) and horizontal flip (``flip``). ``imagefolder``
    is streamed from disk by ``num_workers`` loader processes and transformed per image:
    ``augment`` gives the ImageNet random resized crop to ``image_size`` (default 224) plus the
    flip (``flip``), evaluation resizes the shorter side to ``image_size * 256/224`` and crops
    the centre; ``crop_padding`` does not apply.
    """

    name: DatasetName = "digits"
    root: str | None = None
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    batch_size: int = 128
    eval_batch_size: int = 500
    augment: bool = False
    crop_padding: int = 4
    flip: bool = True
    drop_last: bool = True
    num_workers: int = 0

    def validate(self, prefix: str) -> None:
        _positive_int(self.batch_size, f"{prefix}.batch_size")
        _positive_int(self.eval_batch_size, f"{prefix}.eval_batch_size")
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            if value is not None:
                _positive_int(value, f"{prefix}.{key}")
        if self.crop_padding < 0:
            raise ConfigError(f"{prefix}.crop_padding: must be >= 0, got {self.crop_padding!r}")
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers!r}")
        if self.image_size is not None:
            _positive_int(self.image_size, f"{prefix}.image_size")
            if self.name != "imagefolder":
                raise ConfigError(f"{prefix}.image_size: applies to name 'imagefolder' only")
        if self.download and self.name != "cifar10":
            raise ConfigError(f"{prefix}.download: only name 'cifar10' can be downloaded")
        if self.name in ("mnist", "cifar10", "imagefolder") and self.root is None:
            raise ConfigError(f"{prefix}.root: required for data set {self.name!r}")
        self._validate_normalization(prefix)

    def _validate_normalization(self, prefix: str) -> None:
        if self.mean is None and self.std is None:
            return
        if self.mean is None or self.std is None:
            missing = "mean" if self.mean is None else "std"
            raise ConfigError(f"{prefix}.{missing}: set both mean and std, or neither (null)")
        channels = DATASET_CHANNELS[self.name]
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != channels:
                raise ConfigError(
                    f"{prefix}.{key}: needs one entry per channel of {self.name!r} "
                    f"({channels}), got {len(values)}: {values!r}"
                )
            if not all(math.isfinite(v) for v in values):
                raise ConfigError(f"{prefix}.{key}: entries must be finite, got {values!r}")
        if any(v <= 0 for v in self.std):
            raise ConfigError(f"{prefix}.std: entries must be > 0, got {self.std!r}")


@dataclass
class OptimConfig:
    """Optimiser and per-iteration learning-rate schedule.

    The schedule is linear warm-up over ``warmup_steps`` iterations from 0 to ``lr``, then (for
    ``schedule: cosine``) a cosine decay to ``min_lr`` at the last iteration; ``constant`` keeps
    ``lr``. ``grad_clip`` is the max global gradient norm (0 disables clipping).
    """

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0

    def validate(self, prefix: str) -> None:
        _pos_float(self.lr, f"{prefix}.lr")
        _nonneg_float(self.momentum, f"{prefix}.momentum")
        _nonneg_float(self.weight_decay, f"{prefix}.weight_decay")
        _nonneg_float(self.min_lr, f"{prefix}.min_lr")
        _nonneg_float(self.grad_clip, f"{prefix}.grad_clip")
        _pos_float(self.eps, f"{prefix}.eps")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps: must be >= 0, got {self.warmup_steps!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: must be two numbers in [0, 1), got {self.betas!r}")
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0.0):
            raise ConfigError(f"{prefix}.nesterov: needs name 'sgd' and momentum > 0")


def _monitor_solver_default() -> SolverConfig:
    return SolverConfig(name="broyden", max_iter=60, tol=1e-6)


@dataclass
class TrainConfig:
    """Training loop options.

    ``pretrain_steps`` iterations of plain unrolled training (``model(x, mode="unrolled",
    unrolled_steps=unrolled_steps)``, the MDEQ pre-training stage) come before the DEQ stage.
    Jacobian regularisation adds ``jac_reg_weight * jac_loss`` every ``jac_reg_every``
    iterations (weight 0 disables it). ``eval_every`` is in epochs. ``device``: ``auto``
    picks CUDA when available. ``num_threads`` > 0 sets ``torch.set_num_threads``. With
    several processes ``sync_bn`` makes BatchNorm layers use global-batch statistics (so N
    processes with global batch B train like one process with batch B).

    Precision (:mod:`phantomdeq.train.precision`): ``dtype`` is the *storage* precision of the
    parameters, optimiser state, input batches and the DEQ solver's state (``float64`` for
    reference and reproducibility runs); ``precision`` is the *compute* precision of the
    forward pass: ``bf16`` / ``fp16`` run the stem, the equilibrium cell and the head under
    ``torch.autocast`` (the solver's own arithmetic and the loss stay in fp32; ``fp16`` adds
    dynamic loss scaling with ``torch.amp.GradScaler``, whose state is checkpointed).
    Evaluation and precise-BN recalibration use the same precision. Low-precision compute
    needs ``dtype: float32``.

    Gradient-quality monitor (:mod:`phantomdeq.train.monitor`): every ``monitor_every`` DEQ-stage
    steps (0 = off) the gradient the step uses and the exact implicit gradient (eq. 4, IFT with
    the tight ``monitor_solver``) are computed on the same batch, forward solution and dropout
    mask, w.r.t. the equilibrium cell's parameters (``monitor_params: cell``) or all parameters
    (``all``); their cosine and norm ratio are logged as ``monitor_cos`` /
    ``monitor_norm_ratio`` (its cost as ``monitor_time_s``, excluded from the step timing). It
    changes no update, so these fields may differ on resume.

    ``bn_recalibration_batches`` > 0 recomputes the BatchNorm running statistics before each
    evaluation ("precise BN") from that many training batches (fixed order, no augmentation)
    passed through the model in eval mode -- eval solver, no dropout, no phantom unroll -- with
    only the BatchNorm layers collecting statistics. Early in DEQ training the states seen in
    training and in evaluation differ (the fixed point is not reached yet), and running statistics
    lagging behind fast-moving weights then ruin eval-mode accuracy; training itself is unchanged.

    Reliability (:mod:`phantomdeq.train.guard`): the loss and the global gradient norm are checked
    before every ``optimizer.step`` (all ranks agree), parameters and buffers before every
    checkpoint. ``on_nonfinite: stop`` ends the run with a divergence report naming the step and
    the last finite checkpoint; ``skip`` drops the step (no optimiser, schedule or BatchNorm
    update), counts it in ``metrics.jsonl`` (``skipped``) and the progress bar, and stops after
    ``max_skipped_steps`` consecutive skips. ``checkpoint_every_steps`` > 0 also writes
    ``last.pt`` every that many optimiser steps inside an epoch (0 = at epoch ends only);
    ``--resume`` continues from such a checkpoint exactly where it stopped.

    ``compile: true`` runs the model through ``torch.compile`` (:mod:`phantomdeq.train.compile`):
    a fixed-budget solve (``solver.tol: 0``) becomes one compiled graph; with ``tol > 0`` the
    solve loop runs eagerly around the compiled cell. The first steps pay the compilation.
    """

    epochs: int = 10
    seed: int = 0
    pretrain_steps: int = 0
    unrolled_steps: int = 0
    jac_reg_weight: float = 0.0
    jac_reg_every: int = 1
    eval_every: int = 1
    device: str = "auto"
    num_threads: int = 0
    sync_bn: bool = True
    dtype: Literal["float32", "float64"] = "float32"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    label_smoothing: float = 0.0
    monitor_every: int = 0
    bn_recalibration_batches: int = 0
    monitor_params: Literal["cell", "all"] = "cell"
    monitor_solver: SolverConfig = field(default_factory=_monitor_solver_default)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10
    checkpoint_every_steps: int = 0
    compile: bool = False

    def validate(self, prefix: str) -> None:
        _positive_int(self.epochs, f"{prefix}.epochs")
        _positive_int(self.max_skipped_steps, f"{prefix}.max_skipped_steps")
        if self.checkpoint_every_steps < 0:
            raise ConfigError(
                f"{prefix}.checkpoint_every_steps: must be >= 0 (0 = at epoch ends only), "
                f"got {self.checkpoint_every_steps!r}"
            )
        if self.bn_recalibration_batches < 0:
            raise ConfigError(
                f"{prefix}.bn_recalibration_batches: must be >= 0 (0 = off), "
                f"got {self.bn_recalibration_batches!r}"
            )
        if self.monitor_every < 0:
            raise ConfigError(
                f"{prefix}.monitor_every: must be >= 0 (0 = off), got {self.monitor_every!r}"
            )
        self.monitor_solver.validate(f"{prefix}.monitor_solver")
        _positive_int(self.eval_every, f"{prefix}.eval_every")
        _positive_int(self.jac_reg_every, f"{prefix}.jac_reg_every")
        for key in ("pretrain_steps", "unrolled_steps", "num_threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)!r}")
        if self.pretrain_steps > 0 and self.unrolled_steps < 1:
            raise ConfigError(
                f"{prefix}.unrolled_steps: must be >= 1 when pretrain_steps > 0, "
                f"got {self.unrolled_steps!r}"
            )
        _nonneg_float(self.jac_reg_weight, f"{prefix}.jac_reg_weight")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"{prefix}.label_smoothing: must be in [0, 1), got {self.label_smoothing!r}"
            )
        problem = check_precision(self.precision, self.dtype)
        if problem is not None:
            raise ConfigError(problem)
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ConfigError(
                f"{prefix}.device: allowed 'auto', 'cpu', 'cuda', 'cuda:N'; got {self.device!r}"
            )


@dataclass
class LogConfig:
    """What the run writes: a tqdm progress bar on stderr, a ``kind: step`` record in
    ``metrics.jsonl`` every ``every`` iterations, TensorBoard logs (when installed) and
    ``curves.png`` at the end."""

    progress: bool = True
    every: int = 1
    tensorboard: bool = True
    plot: bool = True

    def validate(self, prefix: str) -> None:
        _positive_int(self.every, f"{prefix}.every")


@dataclass
class Config:
    """A whole training run. ``eval_solver: null`` evaluates with the training ``solver``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    eval_solver: SolverConfig | None = None
    grad: GradConfig = field(default_factory=GradConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Cross-field checks beyond the types (ranges, required combinations)."""
        for name in ("model", "data", "solver", "grad", "optim", "train", "log"):
            getattr(self, name).validate(name)
        if self.eval_solver is not None:
            self.eval_solver.validate("eval_solver")


# --------------------------------------------------------------------------- checks


def _positive_int(value: int, key: str) -> None:
    if value < 1:
        raise ConfigError(f"{key}: must be an integer >= 1, got {value!r}")


def _pos_float(value: float, key: str) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{key}: must be a finite number > 0, got {value!r}")


def _nonneg_float(value: float, key: str) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(f"{key}: must be a finite number >= 0, got {value!r}")


# --------------------------------------------------------------------------- parsing

# YAML 1.1 (PyYAML) reads "1e-4" (no dot) as a string; accept such strings for float fields.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.IGNORECASE)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is dict:
        return "mapping"
    if origin is list:
        (item,) = get_args(tp)
        return f"list of {_type_name(item)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got null")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or isinstance(value, bool):
            raise ConfigError(
                f"{key}: allowed values are {', '.join(map(repr, allowed))}; got {value!r}"
            )
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(
                f"{key}: expected a mapping with string keys, got {type(value).__name__} {value!r}"
            )
        _, item = get_args(tp)
        return {k: _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(
                f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
            )
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_mapping(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:  # pragma: no cover - only reached if a field uses an unsupported annotation
        raise TypeError(f"{key}: unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _from_mapping(cls: Any, raw: Any, prefix: str) -> Any:
    where = prefix or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key; allowed keys in {where}: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def config_from_dict(raw: Any) -> Config:
    """Build and validate a :class:`Config` from a plain mapping (e.g. parsed YAML)."""
    cfg = _from_mapping(Config, raw, "")
    cfg.validate()
    return typing.cast(Config, cfg)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested mapping (YAML / checkpoint friendly)."""
    return dataclasses.asdict(cfg)


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; the value is read as YAML (``0.1``, ``true``, ``null``...)."""
    import yaml

    out: list[tuple[str, Any]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set: expected key=value (e.g. optim.lr=0.05), got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {text!r}: {exc}") from exc
        out.append((key, value))
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a raw config mapping (returns a new mapping; unknown keys are caught
    when the result is parsed)."""
    import copy

    out = copy.deepcopy(raw)
    for key, value in overrides:
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section; cannot set {key}")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply ``key=value`` overrides, parse and validate it.

    A relative ``data.root`` is resolved to an existing directory (:func:`resolve_data_root`).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
    raw = apply_overrides(raw, parse_overrides(overrides or []))
    cfg = config_from_dict(raw)
    if cfg.data.root is not None:
        try:
            cfg.data.root = str(resolve_data_root(cfg.data.root, config_dir=p.resolve().parent))
        except ConfigError as exc:
            if not cfg.data.download:
                hint = " (or --set data.download=true)" if cfg.data.name == "cifar10" else ""
                raise ConfigError(f"{exc}; set data.root to the data directory{hint}") from exc
            cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())  # the loader fills it
    return cfg


def _repo_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / "pyproject.toml").is_file() or (d / ".git").exists():
            return d
    return None


def resolve_data_root(root: str, *, config_dir: Path | None = None) -> Path:
    """Find the data directory ``root``.

    An absolute path must exist. A relative one is tried against the working directory, the
    config file's directory, the repository root (found above the config file, the working
    directory or this package) and the repository's parent (so ``../shared/data/mnist-t10k``
    and ``shared/data/mnist-t10k`` both find a ``shared`` folder next to the repository).
    Raises :class:`ConfigError` naming ``data.root`` and every path tried.
    """
    p = Path(root).expanduser()
    if p.is_absolute():
        if p.is_dir():
            return p
        raise ConfigError(f"data.root: directory {str(p)!r} does not exist")
    bases: list[Path] = [Path.cwd()]
    if config_dir is not None:
        bases.append(config_dir)
    for start in (config_dir, Path.cwd(), Path(__file__).resolve().parent):
        if start is None:
            continue
        repo = _repo_root(start)
        if repo is not None:
            bases += [repo, repo.parent]
    tried: list[str] = []
    for base in bases:
        cand = (base / p).resolve()
        if str(cand) in tried:
            continue
        tried.append(str(cand))
        if cand.is_dir():
            return cand
    raise ConfigError(f"data.root: directory {root!r} not found (tried: {', '.join(tried)})")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable by :func:`load_config`), atomically."""
    import yaml

    with atomic_write(path, "w") as fh:
        fh.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def add_set_argument(parser: Any, help_text: str) -> None:
    """The ``--set KEY=VALUE`` option (repeatable) shared by the train, eval and ablate commands;
    values are parsed and checked by :func:`load_config`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help_text,
    )


#: ``train`` options that may change when a run is resumed (they change no finite update)
RESUMABLE_TRAIN_KEYS = (
    "device",
    "checkpoint_every_steps",
    "on_nonfinite",
    "max_skipped_steps",
)


def config_differences(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs, ignoring what may change on resume:
    ``log.*``, ``train.monitor_*`` and :data:`RESUMABLE_TRAIN_KEYS`."""
    da, db = config_to_dict(a), config_to_dict(b)
    out: list[str] = []
    for section in da:
        if section == "log":
            continue
        sa, sb = da[section], db[section]
        if isinstance(sa, dict) and isinstance(sb, dict):
            for key in sa:
                if section == "train" and (
                    key in RESUMABLE_TRAIN_KEYS or key.startswith("monitor_")
                ):
                    continue
                if sa[key] != sb.get(key):
                    out.append(f"{section}.{key}")
        elif sa != sb:
            out.append(section)
    return out
