"""``task.name: image_classification`` (the default): cross-entropy on class scores, accuracy,
and the chance-level divergence verdict."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from phantomdeq.train.guard import chance_divergence

from . import Task

__all__ = ["ImageClassification"]


class ImageClassification(Task):
    """Class scores ``[B, num_classes]`` against integer labels ``[B]``: the training loss is
    the cross-entropy with ``train.label_smoothing``, the evaluation loss the plain
    cross-entropy; ``acc`` (the share of correct arg-max predictions) picks ``best.pt``. A run
    whose final test accuracy is at chance while its training loss blew up counts as diverged
    (:func:`~phantomdeq.train.guard.chance_divergence`)."""

    metric_names: ClassVar[tuple[str, ...]] = ("loss", "acc")
    primary: ClassVar[str] = "acc"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, num_classes: int = 0, label_smoothing: float = 0.0) -> None:
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: Any, info: Any) -> ImageClassification:
        return cls(int(getattr(info, "num_classes", 0)), cfg.train.label_smoothing)

    @classmethod
    def check(cls, cfg: Any) -> str | None:
        if cfg.data.name == "text":
            return (
                "task.name: 'image_classification' cannot train on data.name: text; set "
                "task.name: language_modelling"
            )
        return None

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(prediction.float(), target, label_smoothing=self.label_smoothing)

    def metrics(
        self, prediction: Tensor, target: Tensor, loss: Tensor | None = None
    ) -> dict[str, float]:
        if loss is None:
            total = float(F.cross_entropy(prediction.float(), target, reduction="sum"))
        else:
            total = float(loss.detach()) * float(target.numel())
        correct = float((prediction.detach().argmax(1) == target).sum())
        return {"loss": total, "acc": correct}

    def divergence(
        self, last_eval: dict[str, float], first_loss: float | None, last_loss: float
    ) -> str:
        return chance_divergence(
            accuracy=last_eval.get("test_acc", float("nan")),
            n=int(last_eval.get("test_n", 0)),
            num_classes=self.num_classes,
            first_loss=first_loss,
            last_loss=last_loss,
        )

    def describe(self, record: dict[str, Any]) -> list[str]:
        return [f"test acc {100 * record['test_acc']:.2f}%"]
