"""Training of DEQ models: typed YAML configs, the training loop, checkpoints, metrics
logging and multi-process data parallelism. The model is a shipped preset or any ``nn.Module``
from ``model.target`` (:mod:`.build`); the ``task`` section chooses the loss and the
metrics (:mod:`.tasks`).

``phantomdeq train --config configs/X.yaml`` (see :mod:`phantomdeq.train.commands`) and
:func:`run_training` are the entry points. Heavy optional dependencies (PyYAML, tqdm,
matplotlib, TensorBoard) are imported only when used.
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
