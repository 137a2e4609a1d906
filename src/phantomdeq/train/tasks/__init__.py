"""Tasks: what a training run minimises and measures (the config's ``task`` section).

The training loop knows no loss and no metric by name: it asks the run's :class:`Task` for the
loss to minimise, for the sums behind its metrics, for the metric that selects ``best.pt`` and
for the end-of-run divergence verdict. A task is a :class:`Task` subclass in its own module and
one line of :data:`TASKS` (``name: "module:Class"``, imported when a run uses it).

Metrics are sums over the batch's *units* (:meth:`Task.count`: images for a classifier, tokens
for a language model) divided by the number of units, so a step, an epoch (weighted by each
step's units), several processes (summed over ranks) and an evaluation all average the same way.
The loop logs metric ``m`` as ``train_<m>`` (steps and epochs) and ``test_<m>`` (evaluations);
the first metric is ``loss`` (the loop checks it for finiteness and reports it).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, ClassVar

from torch import Tensor

#: the run's :class:`phantomdeq.train.config.Config` (not imported: config imports this module)
Config = Any

__all__ = ["TASKS", "Task", "build_task", "task_class"]

#: the tasks a config's ``task.name`` may name: ``name -> "module:Class"`` (a new task is one
#: module and one line here)
TASKS: dict[str, str] = {
    "image_classification": "phantomdeq.train.tasks.classification:ImageClassification",
    "language_modelling": "phantomdeq.train.tasks.language_modelling:LanguageModelling",
}


class Task:
    """What a run minimises and measures. Subclasses set the class attributes and implement
    :meth:`loss` and :meth:`metrics`; the other methods have defaults.

    Attributes:
        metric_names: the metrics :meth:`metrics` returns, the loss first (``("loss", "acc")``).
        primary: the evaluation metric that picks ``best.pt`` (``"acc"``).
        higher_is_better: whether a larger ``primary`` is better.
        throughput: name of a per-second rate of units logged with every step
            (``"tokens_per_s"``), or None for none.
    """

    metric_names: ClassVar[tuple[str, ...]] = ("loss",)
    primary: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    throughput: ClassVar[str | None] = None

    @classmethod
    def from_config(cls, cfg: Config, info: Any) -> Task:
        """The task of a run with config ``cfg`` on a data set described by ``info``."""
        return cls()

    @classmethod
    def check(cls, cfg: Config) -> str | None:
        """A problem with ``cfg`` for this task (one line naming the key), or None."""
        return None

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """The training objective of one batch (a 0-d tensor, the mean over units)."""
        raise NotImplementedError

    def metrics(
        self, prediction: Tensor, target: Tensor, loss: Tensor | None = None
    ) -> dict[str, float]:
        """Sums over the batch's units of each of :attr:`metric_names`. ``loss`` is the batch's
        training objective (given in training, to be reported as ``loss``); without it
        (evaluation) the task computes its evaluation loss."""
        raise NotImplementedError

    def count(self, target: Tensor) -> int:
        """The number of units in a batch (the divisor of :meth:`metrics`' sums)."""
        return int(target.numel())

    def divergence(
        self, last_eval: dict[str, float], first_loss: float | None, last_loss: float
    ) -> str:
        """Why a finished run counts as diverged (empty when it does not), from its last
        evaluation record (``test_*`` keys and ``test_n``), the first step's training loss and
        the last epoch's mean training loss."""
        return ""

    def describe(self, record: dict[str, Any]) -> list[str]:
        """The parts of the one-line epoch report that show an evaluation record's metrics."""
        return [f"test {m} {record[f'test_{m}']:.4f}" for m in self.metric_names]

    def better(self, value: float, best: float | None) -> bool:
        """Whether the evaluation value ``value`` of :attr:`primary` beats ``best`` (None: no
        evaluation yet); a NaN never does."""
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


def task_class(name: str) -> type[Task]:
    """The :class:`Task` subclass registered as ``name`` in :data:`TASKS`."""
    try:
        spec = TASKS[name]
    except KeyError:
        raise ValueError(f"task.name: unknown task {name!r}; allowed: {', '.join(TASKS)}") from None
    module, _, attr = spec.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"TASKS[{name!r}]: {spec} is not a Task subclass")
    if cls.metric_names[:1] != ("loss",) or cls.primary not in cls.metric_names:
        raise TypeError(
            f"TASKS[{name!r}]: {spec} must list 'loss' first in metric_names and its primary "
            f"metric among them"
        )
    return cls


def build_task(cfg: Config, info: Any) -> Task:
    """The task ``cfg.task.name`` for a data set described by ``info``."""
    return task_class(cfg.task.name).from_config(cfg, info)
