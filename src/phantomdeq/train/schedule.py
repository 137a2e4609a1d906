"""The per-iteration learning-rate schedule: linear warm-up, then cosine decay or constant.

When a resumed run changes ``train.epochs`` (extending a finished run), the schedule is
re-planned over the new total from the current step: ``lr(t)`` is the new plan's value at the
current step ``t`` (:func:`replan_note` says so on resume). For a cosine schedule that continues
as the remaining part of a run planned for the new length; continuing at the old plan's end value
would train at ``min_lr`` (0 by default), i.e. not at all."""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import OptimConfig

__all__ = ["LRSchedule", "replan_note"]


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
