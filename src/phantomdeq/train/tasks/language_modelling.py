"""``task.name: language_modelling``: next-token prediction on a text corpus
(``data.name: text``).

The model maps token ids ``[B, T]`` to logits ``[B, T, vocab_size]``; the loss is the mean
per-token cross-entropy (nats), and the metrics are averaged over tokens: ``loss``, ``bpc``
(bits per character, ``loss / ln 2``) and ``acc`` (the share of tokens whose arg-max prediction
is the next character). The validation loss picks ``best.pt`` (lower is better); every training
step logs its ``tokens_per_s``. The solver statistics the loop logs (``fwd_nstep``,
``fwd_converged``) are per sequence, each sequence weighted by its tokens.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from . import Task

__all__ = ["LanguageModelling"]


class LanguageModelling(Task):
    """Per-token cross-entropy of logits ``[B, T, V]`` against the next tokens ``[B, T]``
    (``train.label_smoothing`` in training; plain cross-entropy in evaluation), bits per
    character and next-character accuracy, averaged over tokens.

    A finished run counts as diverged when its validation loss is not below that of the
    uniform guess, ``ln V`` nats, while its training loss ended more than 10 % above where it
    started (a blow-up, not the noise of a few steps at a warm-up learning rate)."""

    metric_names: ClassVar[tuple[str, ...]] = ("loss", "bpc", "acc")
    primary: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    throughput: ClassVar[str | None] = "tokens_per_s"

    def __init__(self, vocab_size: int = 0, label_smoothing: float = 0.0) -> None:
        self.vocab_size = vocab_size
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: Any, info: Any) -> LanguageModelling:
        get = info.get if isinstance(info, dict) else lambda k, d: getattr(info, k, d)
        return cls(int(get("vocab_size", 0)), cfg.train.label_smoothing)

    @classmethod
    def check(cls, cfg: Any) -> str | None:
        if cfg.data.name != "text":
            return (
                f"task.name: 'language_modelling' trains on a text corpus; set data.name: text "
                f"(got {cfg.data.name!r})"
            )
        if cfg.train.warm_start:
            return (
                "train.warm_start: not available for language modelling (it stores one "
                "equilibrium per training sample, and an epoch's text windows are drawn afresh)"
            )
        return None

    @staticmethod
    def _flat(prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if prediction.dim() != 3 or prediction.shape[:2] != target.shape:
            raise ValueError(
                f"language_modelling: the model must return logits [batch, length, vocab] for "
                f"tokens [batch, length] = {tuple(target.shape)}, got {tuple(prediction.shape)}"
            )
        return prediction.float().reshape(-1, prediction.shape[-1]), target.reshape(-1)

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        logits, y = self._flat(prediction, target)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def metrics(
        self, prediction: Tensor, target: Tensor, loss: Tensor | None = None
    ) -> dict[str, float]:
        logits, y = self._flat(prediction.detach(), target)
        n = float(y.numel())
        if loss is None or self.label_smoothing > 0:
            total = float(F.cross_entropy(logits, y, reduction="sum"))
        else:
            total = float(loss.detach()) * n
        correct = float((logits.argmax(1) == y).sum())
        return {"loss": total, "bpc": total / math.log(2), "acc": correct}

    def count(self, target: Tensor) -> int:
        return int(target.numel())

    def divergence(
        self, last_eval: dict[str, float], first_loss: float | None, last_loss: float
    ) -> str:
        test_loss = last_eval.get("test_loss", math.nan)
        if self.vocab_size < 2 or first_loss is None or not math.isfinite(test_loss):
            return ""
        uniform = math.log(self.vocab_size)
        if test_loss >= uniform and last_loss > 1.1 * first_loss:
            return (
                f"validation loss {test_loss:.4f} is no better than the uniform guess "
                f"(ln {self.vocab_size} = {uniform:.4f}) and the training loss rose from "
                f"{first_loss:.4f} to {last_loss:.4f}"
            )
        return ""

    def describe(self, record: dict[str, Any]) -> list[str]:
        return [f"val loss {record['test_loss']:.4f} ({record['test_bpc']:.3f} bpc)"]
