"""Models built through ``model.target`` in the tests (``"custom_models:..."``): a small DEQ
classifier returning ``(logits, info)``, an explicit classifier returning a tensor, broken
factories, and a task registered by a test."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import phantomdeq as pdq
from phantomdeq.train.tasks import Task


class ConvCell(nn.Module):
    """F(z, x) = GroupNorm(relu(conv(z) + x))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.norm(torch.relu(self.conv(z) + x))


class TinyDEQ(nn.Module):
    """stem -> DEQ(ConvCell) -> mean pool -> linear; ``forward(x, generator=None)``."""

    def __init__(self, width: int, in_channels: int, num_classes: int, solver: Any, grad: Any):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.deq = pdq.DEQ(ConvCell(width), solver=solver, grad=grad)
        self.head = nn.Linear(width, num_classes)
        self.generators: list[torch.Generator | None] = []

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Any]:
        self.generators.append(generator)
        inj = self.stem(x)
        z, info = self.deq(torch.zeros_like(inj), inj)
        return self.head(z.mean(dim=(2, 3))), info


def tiny_deq(
    *, width: int = 8, in_channels: int, num_classes: int, solver: Any, grad: Any
) -> TinyDEQ:
    return TinyDEQ(width, in_channels, num_classes, solver, grad)


class Explicit(nn.Module):
    """An explicit classifier of 8x8 images (no DEQ): ``forward(x)`` returns the class
    scores."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * 64, hidden), nn.LayerNorm(hidden), nn.ReLU()
        )
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x))


def explicit(*, in_channels: int, num_classes: int, hidden: int = 16) -> nn.Module:
    return Explicit(in_channels, num_classes, hidden)


def not_a_module(**kwargs: Any) -> dict[str, Any]:
    return dict(kwargs)


def needs_depth(*, depth: int, num_classes: int) -> nn.Module:
    return nn.Linear(depth, num_classes)


def returns_a_string(*, in_channels: int, num_classes: int) -> nn.Module:
    """A model whose forward returns something the trainer cannot read."""

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Linear(1, 1)

        def forward(self, x: Tensor) -> str:
            return "logits"

    return Bad()


NOT_CALLABLE = 3


class ErrorRate(Task):
    """A task the loop has never heard of: cross-entropy, the error rate as the primary metric
    (lower is better) and images per second with every step."""

    metric_names = ("loss", "err")
    primary = "err"
    higher_is_better = False
    throughput = "images_per_s"

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(prediction.float(), target)

    def metrics(
        self, prediction: Tensor, target: Tensor, loss: Tensor | None = None
    ) -> dict[str, float]:
        n = target.numel()
        if loss is None:
            loss = self.loss(prediction, target)
        wrong = float((prediction.detach().argmax(1) != target).sum())
        return {"loss": float(loss.detach()) * n, "err": wrong}
