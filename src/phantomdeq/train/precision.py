"""Mixed precision for training and evaluation (``train.precision``).

Two options describe the numbers of a run, and they are different things:

* ``train.dtype`` (``float32`` | ``float64``) is the *storage* precision: the parameters, the
  optimiser state (the "master weights"), the input batches and the DEQ solver's state,
  history and residuals.
* ``train.precision`` (``fp32`` | ``bf16`` | ``fp16``) is the *compute* precision of the
  forward pass: with ``bf16`` / ``fp16`` the stem, the equilibrium cell ``F`` and the head run
  under ``torch.autocast`` (convolutions and matrix products in the low-precision type), while
  the fixed-point solver keeps an fp32 state and does its own arithmetic (norms, residuals,
  Anderson's mixing, Broyden's updates) outside autocast -- see :meth:`MDEQ.forward
  <phantomdeq.models.mdeq.MDEQ.forward>`. The loss is computed in fp32.

Low-precision compute needs fp32 storage: autocast never converts float64 tensors, so
``precision: bf16`` with ``dtype: float64`` would silently compute in float64; the combination
is refused (:func:`check_precision`). ``fp16`` has 5 exponent bits, so its gradients are scaled
by ``torch.amp.GradScaler`` (dynamic loss scaling); ``bf16`` has fp32's exponent range and
needs none. Both run on CPUs (torch >= 2.3 autocasts convolutions to bf16 and fp16 on CPU and
has a CPU ``GradScaler``), on CUDA ``bf16`` needs a GPU that supports it.

Dynamic loss scaling *skips* the optimiser step when the scaled gradients overflow (then halves
the scale): early in an fp16 run (scale 2^16) and occasionally later this is the normal way the
scale is found, not a divergence. :meth:`MixedPrecision.step` reports whether the step was
applied, so a non-finite-gradient guard must look at the *unscaled* gradients only when the
scaler is off, and count scaler-skipped steps separately.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AUTOCAST_DTYPES",
    "PRECISIONS",
    "MixedPrecision",
    "autocast_context",
    "check_precision",
]

PRECISIONS = ("fp32", "bf16", "fp16")
#: the autocast type of each low-precision setting (``fp32`` runs without autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, dtype: str, device_type: str | None = None) -> str | None:
    """The reason ``precision`` cannot be used with parameter dtype ``dtype`` on
    ``device_type`` (``None`` when it can); the message names the config keys."""
    if precision not in PRECISIONS:
        return f"train.precision: allowed {', '.join(PRECISIONS)}; got {precision!r}"
    if precision != "fp32" and dtype != "float32":
        return (
            f"train.precision: {precision} needs train.dtype float32 (autocast leaves {dtype} "
            f"tensors in {dtype}); use precision fp32 for {dtype} runs"
        )
    if (
        precision == "bf16"
        and device_type == "cuda"
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        return "train.precision: bf16 is not supported by this GPU; use fp16 or fp32"
    return None


def autocast_context(precision: str, device_type: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast(device_type, dtype)`` for ``bf16`` / ``fp16``, a no-op for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])


class MixedPrecision:
    """The compute precision of one training run: the autocast context and, for ``fp16``, the
    gradient scaler (a pass-through for ``fp32`` / ``bf16``).

    One step is ``with mp.autocast(): loss = ...``, ``mp.backward(loss)``, optionally
    ``mp.unscale_(opt)`` before gradient clipping, then ``applied = mp.step(opt)``.
    """

    def __init__(self, precision: str, device_type: str) -> None:
        if precision not in PRECISIONS:
            raise ValueError(
                f"MixedPrecision: precision must be one of {PRECISIONS}, got {precision!r}"
            )
        self.precision = precision
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
        self._unscaled = False

    @property
    def scaling(self) -> bool:
        """Whether gradients are scaled (``fp16``)."""
        return self.scaler.is_enabled()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast_context(self.precision, self.device_type)

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, on the scaled loss for ``fp16``."""
        self.scaler.scale(loss).backward()
        self._unscaled = False

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale in place (before clipping or inspecting them)."""
        if self.scaling and not self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the optimiser step and update the scale. Returns False when the scaler skipped
        the step because the scaled gradients overflowed (the scale was lowered instead)."""
        self._unscaled = False
        if not self.scaling:
            optimizer.step()
            return True
        before = float(self.scaler.get_scale())
        self.scaler.step(optimizer)
        self.scaler.update()
        # the scale only ever decreases when an overflow made the scaler skip the step
        return float(self.scaler.get_scale()) >= before

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 without scaling)."""
        return float(self.scaler.get_scale()) if self.scaling else 1.0
