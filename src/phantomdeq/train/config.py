"""Typed training configuration, parsed once from YAML at the command-line edge.

A config file is a mapping with the sections of :class:`Config` (``model``, ``data``,
``task``, ``solver``, ``eval_solver``, ``grad``, ``optim``, ``train``, ``log``). Every section is a
pydantic model (strict types, unknown keys refused); a refusal is a :class:`ConfigError` naming
the dotted key, what is allowed and the value given. ``--set key=value`` overrides are applied
to the raw mapping before parsing, so they are checked the same way.

pydantic v2 does the parsing: strict typing (no "yes" for a bool, no 2.5 for an int), nested
models, ``extra="forbid"`` and located errors are what the hand-written parser did, and the
solver and estimator sections are *generated* from the classes' keyword-only options
(``pdq.solvers.options``, ``pdq.grad.options``): a new solver or estimator option appears in
the YAML, ``--set`` and the ablation grid without a change here, validated by its class.
New options of the other sections are added as a field with a default.

The ``train`` section of a training config (:class:`TrainConfig`: the loop, precision, the
gradient monitor, reliability, compilation and warm starts) and the metrics label of a
``train.monitor_compare`` estimator.

Finding a config's data directory (``data.root``) from the places a user may mean.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import pydantic
from pydantic import BaseModel, Field

from phantomdeq import grad as grad_estimators
from phantomdeq import solvers as solver_classes
from phantomdeq.data import DATASET_CHANNELS, DOWNLOADABLE
from phantomdeq.models import MDEQ_CONFIG_NAMES
from phantomdeq.presets import PresetError, resolve_config

from .precision import check_precision
from .sections import (
    NESTED_SOLVERS,
    ConfigError,
    Float,
    GradConfig,
    GradSection,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Section,
    SolverConfig,
    SolverSection,
    check_target,
    import_plugins,
    preset_target,
    solver_default,
)
from .tasks import TASKS, task_class

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "GradConfig",
    "GradSection",
    "LogConfig",
    "ModelConfig",
    "NESTED_SOLVERS",
    "OptimConfig",
    "SolverConfig",
    "SolverSection",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "config_differences",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "monitor_label",
    "parse_overrides",
    "reset_options",
    "resolve_data_root",
    "unused_options",
]


# --- the train section ------------------------------------------------------------------------


class TrainConfig(Section):
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
    changes no update, so these fields may differ on resume. ``monitor_compare`` lists further
    estimators (grad sections, e.g. ``[{name: upg, k: 5, lam: 0.5}, {name: npg, k: 5, lam:
    0.5}]``) measured against the same exact gradient without training with them -- the paper's
    Fig. 2 along an IFT-trained run -- logged as ``monitor_cos_<label>`` /
    ``monitor_norm_ratio_<label>`` with ``<label>`` = :func:`monitor_label` (``upg_k5_lam0.5``).
    ``{name: shine}`` reuses the forward solve's inverse estimate and needs ``solver.name:
    broyden``.

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

    ``compile: true`` runs the model through ``torch.compile`` (:mod:`phantomdeq.train.build`):
    a fixed-budget solve (``solver.tol: 0``) becomes one compiled graph; with ``tol > 0`` the
    solve loop runs eagerly around the compiled cell. The first steps pay the compilation.

    ``warm_start: true`` (:mod:`phantomdeq.train.warm_start`) keeps every training sample's
    last equilibrium in bfloat16 -- on the training device, or in pinned CPU memory with
    ``warm_start_memory: pinned`` on CUDA -- and starts the sample's next DEQ-stage solve
    there (samples not yet solved start from zeros). Its memory is printed when it is
    allocated (the first DEQ step); it is saved in checkpoints, so resuming stays exact.
    One process only (with several, each would hold only its own shard's states).
    """

    epochs: PosInt = 10
    seed: int = 0
    pretrain_steps: NonNegInt = 0
    unrolled_steps: NonNegInt = 0
    jac_reg_weight: NonNegFloat = 0.0
    jac_reg_every: PosInt = 1
    eval_every: PosInt = 1
    device: str = "auto"
    num_threads: NonNegInt = 0
    sync_bn: bool = True
    dtype: Literal["float32", "float64"] = "float32"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    label_smoothing: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.0
    monitor_every: NonNegInt = 0
    bn_recalibration_batches: NonNegInt = 0
    monitor_params: Literal["cell", "all"] = "cell"
    monitor_solver: SolverConfig = Field(
        default_factory=solver_default(name="broyden", max_iter=60, tol=1e-6)
    )
    monitor_compare: list[GradConfig] = Field(default_factory=list)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: PosInt = 10
    checkpoint_every_steps: NonNegInt = 0
    compile: bool = False
    warm_start: bool = False
    warm_start_memory: Literal["device", "pinned"] = "device"

    def check(self, prefix: str) -> None:
        self.monitor_solver.check(f"{prefix}.monitor_solver")
        labels: list[str] = []
        for i, g in enumerate(self.monitor_compare):
            g.check(f"{prefix}.monitor_compare[{i}]")
            if g.name == "bptt":
                raise ConfigError(
                    f"{prefix}.monitor_compare[{i}].name: 'bptt' cannot be compared (it needs the "
                    f"forward iterations recorded); allowed: ift, upg, npg, onestep"
                )
            label = monitor_label(g)
            if label in labels:
                raise ConfigError(
                    f"{prefix}.monitor_compare[{i}]: estimator {label!r} is listed twice"
                )
            labels.append(label)
        if self.pretrain_steps > 0 and self.unrolled_steps < 1:
            raise ConfigError(
                f"{prefix}.unrolled_steps: must be >= 1 when pretrain_steps > 0, "
                f"got {self.unrolled_steps!r}"
            )
        problem = check_precision(self.precision, self.dtype)
        if problem is not None:
            raise ConfigError(problem)
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ConfigError(
                f"{prefix}.device: allowed 'auto', 'cpu', 'cuda', 'cuda:N'; got {self.device!r}"
            )


def monitor_label(g: GradConfig) -> str:
    """The metrics label of a ``train.monitor_compare`` estimator: its name, plus ``_k<k>_lam<λ>``
    for the phantom gradients (``upg_k5_lam0.5``)."""
    if g.name in ("upg", "npg"):
        opts = g.kwargs()  # k and lam, fields of the generated GradConfig
        return f"{g.name}_k{opts['k']}_lam{float(opts['lam']):g}"
    return str(g.name)


# --- where the data live (data.root) ----------------------------------------------------------


def _repo_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / "pyproject.toml").is_file() or (d / ".git").exists():
            return d
    return None


def _search_bases(config_dir: Path | None) -> list[Path]:
    """Where a relative data path is looked up, in order (see :func:`resolve_data_root`)."""
    bases: list[Path] = [Path.cwd()]
    if config_dir is not None:
        bases.append(config_dir)
    for start in (config_dir, Path.cwd(), Path(__file__).resolve().parent):
        if start is None:
            continue
        repo = _repo_root(start)
        if repo is not None:
            bases += [repo, repo.parent]
    return bases


def _resolve(path: str, key: str, kind: str, config_dir: Path | None) -> Path:
    want = Path.is_dir if kind == "directory" else Path.is_file
    p = Path(path).expanduser()
    if p.is_absolute():
        if want(p):
            return p
        raise ConfigError(f"{key}: {kind} {str(p)!r} does not exist")
    tried: list[str] = []
    for base in _search_bases(config_dir):
        cand = (base / p).resolve()
        if str(cand) in tried:
            continue
        tried.append(str(cand))
        if want(cand):
            return cand
    raise ConfigError(f"{key}: {kind} {path!r} not found (tried: {', '.join(tried)})")


def resolve_data_root(root: str, *, config_dir: Path | None = None) -> Path:
    """Find the data directory ``root``.

    An absolute path must exist. A relative one is tried against the working directory, the
    config file's directory, the repository root (found above the config file, the working
    directory or this package) and the repository's parent (so ``../shared/data/mnist-t10k``
    and ``shared/data/mnist-t10k`` both find a ``shared`` folder next to the repository).
    Raises :class:`ConfigError` naming ``data.root`` and every path tried.
    """
    return _resolve(root, "data.root", "directory", config_dir)


def resolve_data_file(path: str, *, config_dir: Path | None = None) -> Path:
    """Find the data file ``path`` (``data.path`` of a text corpus) the way
    :func:`resolve_data_root` finds a directory; :class:`ConfigError` naming ``data.path`` and
    every path tried when it is not found."""
    return _resolve(path, "data.path", "file", config_dir)


# --- the config and its files -----------------------------------------------------------------

# --------------------------------------------------------------------------- the other sections


class ModelConfig(Section):
    """The model: a shipped preset (``name``) or any ``nn.Module`` from a factory (``target``).

    ``name`` is one of the MDEQ sizes (``mdeq_tiny``, ``mdeq_cifar10m``, ``mdeq_imagenet18m``),
    presets of ``target: "phantomdeq.models:build_mdeq"`` with ``kwargs: {size: NAME}``;
    ``dropout`` replaces the preset's variational-dropout rate (null keeps it) and
    ``overrides`` other architecture fields (e.g. ``channels``).

    ``target: "package.module:factory"`` builds any model: the factory (a function or an
    ``nn.Module`` class, imported from the working directory or the installed packages) is
    called with ``kwargs`` plus what its signature names among the solver and estimator built
    from the config (``solver``, ``grad``, ``eval_solver``, ``correction``) and the data set's
    description (``num_classes``, ``in_channels``, ...). Its ``forward(x)`` returns predictions,
    ``(predictions, info)`` with the DEQ's :class:`phantomdeq.Solution`, or an object with
    ``.logits`` (:mod:`phantomdeq.train.build`). Give ``name`` or ``target``, not both
    (``name`` is null when ``target`` is given).
    """

    name: Annotated[str, Field(min_length=1)] | None = "mdeq_tiny"
    target: Annotated[str, Field(min_length=1)] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    dropout: Annotated[Float, Field(ge=0.0, lt=1.0)] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    def check(self, prefix: str) -> None:
        if self.target is None:
            if self.name is None:
                raise ConfigError(
                    f"{prefix}.name: give a preset ({', '.join(MDEQ_CONFIG_NAMES)}) or "
                    f"{prefix}.target: 'package.module:factory'"
                )
            if self.name not in MDEQ_CONFIG_NAMES:
                raise ConfigError(
                    f"{prefix}.name: unknown preset {self.name!r}; allowed: "
                    f"{', '.join(MDEQ_CONFIG_NAMES)} (or {prefix}.target: 'package.module:factory')"
                )
            if self.kwargs:
                raise ConfigError(
                    f"{prefix}.kwargs: applies to {prefix}.target; a preset takes "
                    f"{prefix}.dropout and {prefix}.overrides"
                )
            return
        if self.name is not None:
            if "name" in self.model_fields_set:
                raise ConfigError(
                    f"{prefix}.name: give {prefix}.name (a preset) or {prefix}.target, not both"
                )
            self.name = None  # the default preset does not apply to a target
        for key in ("dropout", "overrides"):
            if key in self.model_fields_set and getattr(self, key):
                raise ConfigError(
                    f"{prefix}.{key}: applies to the {prefix}.name presets; with "
                    f"{prefix}.target pass the factory's arguments in {prefix}.kwargs"
                )
        check_target(self.target, self.kwargs, prefix)

    def resolved(self) -> tuple[str, dict[str, Any]]:
        """``(target, kwargs)`` of this model, a preset's included."""
        if self.target is not None:
            return self.target, dict(self.kwargs)
        return preset_target(str(self.name), self.dropout, dict(self.overrides))


class TaskConfig(Section):
    """What the run minimises and measures (:mod:`phantomdeq.train.tasks`):
    ``image_classification`` (the default) -- cross-entropy on class scores, accuracy (which
    picks ``best.pt``) and the chance-level divergence check; ``language_modelling`` (with
    ``data.name: text``) -- per-token cross-entropy, bits per character and next-character
    accuracy, the validation loss picking ``best.pt``, tokens per second."""

    name: str = "image_classification"

    def check(self, prefix: str) -> None:
        if self.name not in TASKS:
            raise ConfigError(
                f"{prefix}.name: unknown task {self.name!r}; allowed: {', '.join(TASKS)}"
            )


class DataConfig(Section):
    """Data set and batching. ``batch_size`` is the *global* batch (split over DDP ranks).
    ``download: true`` fetches MNIST or CIFAR-10 into ``root`` when files are missing, checking
    each download against its published MD5.

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

    ``text`` (a language-model corpus, :func:`phantomdeq.data.load_text_dataset`): ``path`` is a
    UTF-8 text file (looked up like ``root``), its characters the vocabulary (saved with the
    run), the first ``train_fraction`` of it the training split and the rest validation;
    ``context`` tokens per window. An epoch draws ``train_size`` random windows (default: about
    one pass over the training tokens); evaluation reads ``test_size`` evenly spread
    non-overlapping validation windows (default: all of them).
    """

    name: Literal["digits", "mnist", "cifar10", "imagefolder", "text"] = "digits"
    root: str | None = None
    path: str | None = None
    context: PosInt | None = None
    train_fraction: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.9
    download: bool = False
    train_size: PosInt | None = None
    test_size: PosInt | None = None
    image_size: PosInt | None = None
    mean: list[Float] | None = None
    std: list[Float] | None = None
    batch_size: PosInt = 128
    eval_batch_size: PosInt = 500
    augment: bool = False
    crop_padding: NonNegInt = 4
    flip: bool = True
    drop_last: bool = True
    num_workers: NonNegInt = 0

    def check(self, prefix: str) -> None:
        text_keys = ("path", "context")
        if self.name == "text":
            for key in text_keys:
                if getattr(self, key) is None:
                    raise ConfigError(f"{prefix}.{key}: required for data set 'text'")
            for key in ("root", "download", "augment", "mean", "std"):
                if getattr(self, key) not in (None, False):
                    raise ConfigError(f"{prefix}.{key}: applies to the image data sets, not 'text'")
            return
        for key in text_keys:
            if getattr(self, key) is not None:
                raise ConfigError(f"{prefix}.{key}: applies to data set 'text' only")
        if self.train_fraction != 0.9:
            raise ConfigError(f"{prefix}.train_fraction: applies to data set 'text' only")
        if self.image_size is not None and self.name != "imagefolder":
            raise ConfigError(f"{prefix}.image_size: applies to name 'imagefolder' only")
        if self.download and self.name not in DOWNLOADABLE:
            allowed = " and ".join(repr(n) for n in DOWNLOADABLE)
            raise ConfigError(
                f"{prefix}.download: only names {allowed} can be downloaded, not {self.name!r}"
            )
        if self.name in ("mnist", "cifar10", "imagefolder") and self.root is None:
            raise ConfigError(f"{prefix}.root: required for data set {self.name!r}")
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
        if any(v <= 0 for v in self.std):
            raise ConfigError(f"{prefix}.std: entries must be > 0, got {self.std!r}")


Beta = Annotated[Float, Field(ge=0.0, lt=1.0)]


class OptimConfig(Section):
    """Optimiser and per-iteration learning-rate schedule.

    ``sgd`` (``momentum``, ``nesterov``) and ``adam`` (``betas``, ``eps``) apply
    ``weight_decay`` to every parameter (L2, added to the gradient); ``adamw`` (``betas``,
    ``eps``) decays decoupled from the gradient and only the weights of linear, convolution and
    embedding layers: no decay on biases, on normalisation layers' parameters (BatchNorm,
    GroupNorm, LayerNorm, ...) nor on any other 1-d parameter
    (:func:`~phantomdeq.train.weight_decay_groups`).

    The schedule is linear warm-up over ``warmup_steps`` iterations from 0 to ``lr``, then (for
    ``schedule: cosine``) a cosine decay to ``min_lr`` at the last iteration; ``constant`` keeps
    ``lr``. ``grad_clip`` is the max global gradient norm (0 disables clipping).
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PosFloat = 0.1
    momentum: NonNegFloat = 0.9
    nesterov: bool = False
    betas: Annotated[list[Beta], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.999]
    )
    eps: PosFloat = 1e-8
    weight_decay: NonNegFloat = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: NonNegInt = 0
    min_lr: NonNegFloat = 0.0
    grad_clip: NonNegFloat = 0.0

    def check(self, prefix: str) -> None:
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0.0):
            raise ConfigError(f"{prefix}.nesterov: needs name 'sgd' and momentum > 0")


class LogConfig(Section):
    """What the run writes: a tqdm progress bar on stderr, a ``kind: step`` record in
    ``metrics.jsonl`` every ``every`` iterations, TensorBoard logs (when installed) and
    ``curves.png`` at the end."""

    progress: bool = True
    every: PosInt = 1
    tensorboard: bool = True
    plot: bool = True


class Config(Section):
    """A whole training run. ``eval_solver: null`` evaluates with the training ``solver``.
    ``plugins``: modules imported before the rest is parsed, which register user solvers and
    estimators (:func:`~phantomdeq.train.sections.import_plugins`)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    solver: SolverConfig = Field(default_factory=SolverConfig)
    eval_solver: SolverConfig | None = None
    grad: GradConfig = Field(default_factory=GradConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    plugins: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)

    def validate(self) -> None:  # type: ignore[override]
        """Cross-field checks beyond the types (ranges the classes own, combinations)."""
        for name in ("model", "data", "task", "solver", "grad", "optim", "train", "log"):
            getattr(self, name).check(name)
        problem = task_class(self.task.name).check(self)
        if problem is not None:
            raise ConfigError(problem)
        if self.eval_solver is not None:
            self.eval_solver.check("eval_solver")
        for i, g in enumerate(self.train.monitor_compare):
            if (
                grad_estimators.ESTIMATORS[g.name].needs_forward_inverse
                and self.solver.name != "broyden"
            ):
                raise ConfigError(
                    f"train.monitor_compare[{i}].name: {g.name!r} reuses the forward Broyden "
                    f"solve's inverse estimate and needs solver.name 'broyden', got "
                    f"{self.solver.name!r}"
                )
        if (
            self.train.compile
            and getattr(self.grad, "k", None) == "auto"
            and "k" in grad_estimators.options(self.grad.name)
        ):
            raise ConfigError(
                f"grad.k: {self.grad.name.upper()}(k='auto') reads its stopping test on the "
                "host at every step and cannot run with train.compile: true; set a fixed "
                "grad.k or train.compile: false"
            )


def unused_options(cfg: Config) -> list[str]:
    """Dotted keys that do not apply to this run: the grad options its estimator does not
    declare (``backward_solver`` standing for ``solver``), the solver options its solver class
    does not declare, ``train.unrolled_steps`` without pretraining."""
    used = {NESTED_SOLVERS.get(k, k) for k in grad_estimators.options(cfg.grad.name)}
    out = [
        f"grad.{k}" for k in type(cfg.grad).model_fields if k not in used | {"name", "correction"}
    ]
    used = set(solver_classes.options(cfg.solver.name))
    out += [f"solver.{k}" for k in type(cfg.solver).model_fields if k not in used | {"name"}]
    if cfg.train.pretrain_steps == 0:
        out.append("train.unrolled_steps")
    return out


def reset_options(cfg: Config, keys: list[str]) -> Config:
    """A copy of ``cfg`` with the dotted ``keys`` (of sections) set to their defaults."""
    out = cfg.model_copy(deep=True)
    for key in keys:
        section, name = key.split(".")
        node = getattr(out, section)
        default = type(node).model_fields[name].get_default(call_default_factory=True)
        setattr(node, name, default)
    return out


# --------------------------------------------------------------------------- parsing


def _section_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    cls: Any = Config
    for part in path:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        models = [
            a
            for a in (get_args(field.annotation) or (field.annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not models:
            return None
        cls = models[0]
    return cls


def _message(err: Any) -> str:
    loc = err["loc"]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    value = err["input"]
    if err["type"] == "extra_forbidden":
        section = _section_at(loc[:-1])
        where = ".".join(str(p) for p in loc[:-1]) or "config"
        allowed = ", ".join(section.model_fields) if section is not None else "?"
        return f"{key}: unknown key; allowed keys in {where}: {allowed}"
    if err["type"] in ("model_type", "model_attributes_type"):
        return f"{key or 'config'}: expected a mapping, got {type(value).__name__} {value!r}"
    text = err["msg"][0].lower() + err["msg"][1:]
    section = _section_at(loc[:-1])
    field = None if section is None else section.model_fields.get(str(loc[-1]))
    if field is not None and type(None) in get_args(field.annotation):
        text += " or null"
    return f"{key}: {text}; got {type(value).__name__} {value!r}"


def config_from_dict(raw: Any) -> Config:
    """Build and validate a :class:`Config` from a plain mapping (e.g. parsed YAML)."""
    import_plugins(raw)
    try:
        cfg = Config.model_validate({} if raw is None else raw)
    except pydantic.ValidationError as exc:
        raise ConfigError("; ".join(_message(e) for e in exc.errors())) from None
    cfg.validate()
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested mapping (YAML / checkpoint friendly)."""
    return cfg.model_dump()


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

    ``path`` is a file or the name of a shipped preset (``mdeq_tiny_digits``,
    ``ablation/mnist_upg``; :mod:`phantomdeq.presets`). A relative ``data.root`` is resolved to
    an existing directory (:func:`resolve_data_root`). An empty file (or comments only) is a
    :class:`ConfigError`; ``{}`` asks for the defaults.
    """
    import yaml

    try:
        p = resolve_config(path)
    except PresetError as exc:
        raise ConfigError(str(exc)) from None
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if raw is None:  # empty, or comments only: a mistake far more often than a wish
        raise ConfigError(
            f"config file {str(p)!r} is empty (no settings); write the settings in it (the "
            f"presets are a start: phantomdeq configs), or {{}} to train the defaults"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
    raw = apply_overrides(raw, parse_overrides(overrides or []))
    cfg = config_from_dict(raw)
    if cfg.data.path is not None:
        cfg.data.path = str(resolve_data_file(cfg.data.path, config_dir=p.resolve().parent))
    if cfg.data.root is not None:
        try:
            cfg.data.root = str(resolve_data_root(cfg.data.root, config_dir=p.resolve().parent))
        except ConfigError as exc:
            if not cfg.data.download:
                hint = " (or --set data.download=true)" if cfg.data.name in DOWNLOADABLE else ""
                raise ConfigError(f"{exc}; set data.root to the data directory{hint}") from exc
            cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())  # the loader fills it
    return cfg


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
    "compile",
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
