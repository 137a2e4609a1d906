"""Everything a run builds from its config: solvers, the gradient estimator, the model, the data
sets, the device and the optimiser. Shared by ``phantomdeq train`` and ``phantomdeq eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, GradConfig, OptimConfig, SolverConfig, SolverSection
from .distributed import DistInfo

__all__ = [
    "build_correction",
    "build_grad",
    "build_model",
    "build_solver",
    "info_get",
    "load_data",
    "make_optimizer",
    "weight_decay_groups",
    "prepare_data",
    "resolve_device",
]


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
    return Correction(states=c.states, gamma=c.gamma) if c.states > 1 else None


def build_model(
    cfg: Config,
    num_classes: int | None = None,
    in_channels: int | None = None,
    *,
    info: Any = None,
) -> nn.Module:
    """The model of ``cfg.model`` (a preset or ``model.target``; see
    :mod:`.model_target`), given the solvers and estimator of the config's sections and the
    data set's description ``info`` (:class:`phantomdeq.data.DataInfo`; ``num_classes`` and
    ``in_channels``, when given, replace its fields)."""
    from .model_target import build_target, info_fields

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


def prepare_data(cfg: Config) -> None:
    """What must happen once before :func:`load_data`: the CIFAR-10 or MNIST download with
    ``data.download`` (safe for concurrent callers; a multi-process job calls it on rank 0
    and lets the other ranks wait at a barrier, so it is fetched once)."""
    from phantomdeq.data import prepare_dataset

    d = cfg.data
    prepare_dataset(d.name, d.root, download=d.download)


def load_data(cfg: Config) -> tuple[Any, Any, Any]:
    """``(train, test, info)`` for ``cfg.data`` (:func:`phantomdeq.data.load_dataset`); calls
    :func:`prepare_data` first (a no-op when the data are present).

    Raises:
        ConfigError: ``data.root`` is missing or lacks the expected files.
        phantomdeq.data.DataError: another data problem (one line naming the file or option,
            e.g. ``data.train_size`` above the size of the set); the commands report it with
            exit status 2.
    """
    from phantomdeq.data import load_dataset

    d = cfg.data
    if d.root is not None and not Path(d.root).is_dir() and not d.download:
        raise ConfigError(f"data.root: directory {d.root!r} does not exist")
    extra: dict[str, Any] = {}
    if d.name == "imagefolder":
        extra = {"image_size": d.image_size, "augment": d.augment, "flip": d.flip}
    try:
        prepare_data(cfg)
        return load_dataset(
            d.name,
            d.root,
            seed=cfg.train.seed,
            train_size=d.train_size,
            test_size=d.test_size,
            mean=d.mean,
            std=d.std,
            **extra,
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"data.root: {' '.join(str(exc).split())}") from exc


def info_get(info: Any, key: str) -> Any:
    if isinstance(info, dict):
        return info[key]
    return getattr(info, key)


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
