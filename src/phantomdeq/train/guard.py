"""Non-finite guards and divergence verdicts of the training loop.

* :func:`grad_norm` -- the global gradient norm, computed once per step before
  ``optimizer.step``: it is non-finite exactly when some gradient entry is (or the norm
  overflows), and gradient clipping reuses it.
* :func:`nonfinite_entries` -- names of parameters *and* buffers (BatchNorm running statistics)
  holding NaN/inf, checked before every checkpoint is written.
* :class:`BufferSnapshot` -- copies of the BatchNorm buffers taken before a training forward,
  put back when the step is dropped (``train.on_nonfinite: skip``), so a dropped step leaves no
  trace in the running statistics.
* :func:`chance_bound` / :func:`at_chance` -- a test accuracy indistinguishable from guessing
  (within three binomial standard deviations of ``1 / num_classes``); :func:`chance_divergence`
  -- the end-of-training verdict: at chance *and* a training loss above twice its first value
  (a run that merely has not learned yet keeps its loss near the first value).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "BufferSnapshot",
    "at_chance",
    "chance_bound",
    "chance_divergence",
    "grad_norm",
    "nonfinite_entries",
]


def grad_norm(params: Iterable[nn.Parameter]) -> Tensor:
    """Euclidean norm of all gradients together (a 0-d tensor; 0 when there are none)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def nonfinite_entries(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` with a NaN or inf."""
    bad: list[str] = []
    with torch.no_grad():
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


class BufferSnapshot:
    """Copies of every BatchNorm buffer of ``module`` (running mean/variance and the batch
    counter); :meth:`restore` writes them back in place."""

    def __init__(self, module: nn.Module) -> None:
        self._saved: list[tuple[Tensor, Tensor]] = []
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if buf is not None:
                        self._saved.append((buf, buf.detach().clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for buf, copy in self._saved:
                buf.copy_(copy)


def chance_bound(num_classes: int, n: int) -> float:
    """The highest accuracy that guessing reaches with appreciable probability on ``n`` test
    samples: ``p + 3 sqrt(p (1 - p) / n)`` with ``p = 1 / num_classes``."""
    if num_classes < 2 or n < 1:
        raise ValueError(f"chance_bound: need num_classes >= 2 and n >= 1, got {num_classes}, {n}")
    p = 1.0 / num_classes
    return p + 3.0 * math.sqrt(p * (1.0 - p) / n)


def at_chance(accuracy: float, num_classes: int, n: int) -> bool:
    """Whether ``accuracy`` on ``n`` samples is within noise of guessing (or not a number)."""
    return not math.isfinite(accuracy) or accuracy <= chance_bound(num_classes, n)


def chance_divergence(
    *,
    accuracy: float,
    n: int,
    num_classes: int,
    first_loss: float | None,
    last_loss: float,
) -> str:
    """Why a finished run counts as diverged (empty when it does not): test ``accuracy`` on
    ``n`` samples at chance level and the last epoch's mean training loss ``last_loss`` above
    twice the first step's ``first_loss`` (or not a number)."""
    if n < 1 or num_classes < 2 or first_loss is None:
        return ""
    if not at_chance(accuracy, num_classes, n) or last_loss <= 2.0 * first_loss:
        return ""
    return (
        f"the test accuracy {100 * accuracy:.1f} % is at chance level for {num_classes} classes "
        f"and the training loss blew up from {first_loss:.3g} (step 1) to {last_loss:.3g} "
        f"(last epoch's mean)"
    )
