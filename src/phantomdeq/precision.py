"""Mixed precision for DEQs: a low-precision cell ``f`` with a float32 solver state.

The solvers keep their own arithmetic (norms, residuals, Anderson's Gram matrix and small
solve, Broyden's updates) in float32 or wider whatever the state's dtype, and never under the
caller's autocast. To run the expensive part — the cell — in bfloat16/float16 while the fixed
point itself is resolved in float32, wrap the cell::

    deq = pdq.DEQ(pdq.AutocastCell(cell, dtype=torch.bfloat16), solver=..., grad=...)
    z, info = deq(torch.zeros(B, D), x)          # float32 state, cell under autocast

:class:`AutocastCell` runs ``f`` under ``torch.autocast`` and casts its output back to the
state's dtype, so the DEQ sees a float32 map; the gradient estimators differentiate through
the same autocast region. The residual a solve can reach is then set by the cell's precision
(about 1e-2 relative for bfloat16, 1e-3 for float16), not by the state's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._state import State

__all__ = ["LOW_PRECISION_DTYPES", "AutocastCell"]

LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
"""The low-precision dtypes :class:`AutocastCell` runs a cell in (bfloat16, float16)."""


class AutocastCell(nn.Module):
    """``f`` run under ``torch.autocast(device_type, dtype)``, its output cast to the state's dtype.

    Args:
        f: the cell ``f(z, *inputs) -> z`` (an ``nn.Module``; its parameters and buffers are
            registered here, so ``state_dict`` keys gain an ``f.`` prefix).
        dtype: ``torch.bfloat16`` (default) or ``torch.float16``.
        device_type: ``"cpu"`` or ``"cuda"``; ``None`` (default) takes the state's device type
            at each call.

    The output has the structure of ``f``'s output with each tensor in the dtype of the matching
    part of ``z``.
    """

    def __init__(
        self, f: nn.Module, *, dtype: torch.dtype = torch.bfloat16, device_type: str | None = None
    ) -> None:
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"AutocastCell: f must be a torch.nn.Module, got {type(f).__name__}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(
                f"AutocastCell: dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}"
            )
        if dtype not in LOW_PRECISION_DTYPES:
            raise ValueError(
                f"AutocastCell: dtype must be one of {LOW_PRECISION_DTYPES}, got {dtype}"
            )
        if device_type is not None and not isinstance(device_type, str):
            raise TypeError(
                f"AutocastCell: device_type must be None, 'cpu' or 'cuda', got "
                f"{type(device_type).__name__}"
            )
        if device_type not in (None, "cpu", "cuda"):
            raise ValueError(
                f"AutocastCell: device_type must be None, 'cpu' or 'cuda', got {device_type!r}"
            )
        self.f = f
        self.dtype = dtype
        self.device_type = device_type

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, device_type={self.device_type!r}"

    def forward(self, z: State, *inputs: Any) -> Any:
        first = z if isinstance(z, Tensor) else z[0]
        device_type = self.device_type or first.device.type
        with torch.autocast(device_type, dtype=self.dtype):
            out = self.f(z, *inputs)
        if isinstance(out, Tensor):
            return out.to(first.dtype)
        if isinstance(out, tuple) and isinstance(z, tuple):
            return tuple(o.to(zi.dtype) for o, zi in zip(out, z))
        return out  # a structure mismatch: the DEQ's output check names it
