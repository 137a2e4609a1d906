"""Training of DEQ models: typed YAML configs, the training loop, checkpoints, metrics
logging and multi-process data parallelism. The model is a shipped preset or any ``nn.Module``
from ``model.target`` (:mod:`.build`); the ``task`` section chooses the loss and the
metrics (:mod:`.tasks`).

``phantomdeq train --config configs/X.yaml`` (see :mod:`phantomdeq.train.commands`) and
:func:`run_training` are the entry points. Heavy optional dependencies (PyYAML, tqdm,
matplotlib, TensorBoard) are imported only when used.

The modules: :mod:`.trainer` (the loop, one class read top to bottom), and what it calls --
:mod:`.config` and :mod:`.sections` (the YAML), :mod:`.build` (solvers, estimator, model,
optimiser, schedule), :mod:`.data` (data sets, batches, evaluation), :mod:`.tasks` (loss and
metrics), :mod:`.precision`, :mod:`.warm_start`, :mod:`.run_folder` (the folder, checkpoints,
resume), :mod:`.distributed`, :mod:`.monitor`, :mod:`.guard` (non-finite values, divergence,
signals), :mod:`.metrics` (``metrics.jsonl``, figures, reports) and :mod:`.commands` (the
``train`` and ``eval`` commands).
"""

from __future__ import annotations

from .build import LRSchedule, weight_decay_groups
from .config import (
    Config,
    ConfigError,
    DataConfig,
    GradConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    SolverConfig,
    TaskConfig,
    TrainConfig,
    config_from_dict,
    load_config,
)
from .data import evaluate
from .run_folder import (
    CheckpointError,
    OutputWriteError,
    UnverifiedCheckpointWarning,
    load_checkpoint,
    save_checkpoint,
)
from .trainer import Trainer, TrainingError, TrainingInterrupted, run_training

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "GradConfig",
    "LRSchedule",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputWriteError",
    "SolverConfig",
    "TaskConfig",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "UnverifiedCheckpointWarning",
    "config_from_dict",
    "evaluate",
    "load_checkpoint",
    "load_config",
    "run_training",
    "save_checkpoint",
    "weight_decay_groups",
]
