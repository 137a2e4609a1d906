"""The per-iteration learning-rate schedule: linear warm-up, then cosine decay or constant."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["LRSchedule"]


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
