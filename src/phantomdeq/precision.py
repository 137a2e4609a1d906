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

The caller's autocast. A DEQ called inside ``torch.autocast`` (the usual mixed-precision idiom,
``with torch.autocast("cuda"): out = model(x)``) does the same on its own: :func:`under_autocast`
wraps its cell for that call, so ``f`` runs under the caller's autocast and its output comes
back in the state's dtype, while the solvers' arithmetic runs outside it
(:func:`caller_autocast`, :func:`in_autocast`). This module is the one owner of both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._state import State

__all__ = [
    "LOW_PRECISION_DTYPES",
    "AutocastCell",
    "caller_autocast",
    "cast_like",
    "in_autocast",
    "under_autocast",
]

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
        cache_enabled: ``torch.autocast``'s weight-cast cache (default True).

    The output has the structure of ``f``'s output with each tensor in the dtype of the matching
    part of ``z``.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device_type: str | None = None,
        cache_enabled: bool = True,
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
        if not isinstance(cache_enabled, bool):
            raise TypeError(
                f"AutocastCell: cache_enabled must be True or False, got {cache_enabled!r}"
            )
        self.f = f
        self.dtype = dtype
        self.device_type = device_type
        self.cache_enabled = cache_enabled

    def extra_repr(self) -> str:
        cache = "" if self.cache_enabled else ", cache_enabled=False"
        return f"dtype={self.dtype}, device_type={self.device_type!r}{cache}"

    def forward(self, z: State, *inputs: Any) -> Any:
        device_type = self.device_type or _first(z).device.type
        with torch.autocast(device_type, dtype=self.dtype, cache_enabled=self.cache_enabled):
            out = self.f(z, *inputs)
        return cast_like(out, z)


def _first(z: State) -> Tensor:
    return z if isinstance(z, Tensor) else z[0]


def cast_like(out: Any, z: State) -> Any:
    """``out`` (a cell's output) with each tensor in the dtype of the matching part of ``z``;
    any other structure unchanged (the DEQ's output check names the mismatch)."""
    if isinstance(out, Tensor):
        return out.to(_first(z).dtype)
    if isinstance(out, tuple) and isinstance(z, tuple):
        return tuple(o.to(zi.dtype) if isinstance(o, Tensor) else o for o, zi in zip(out, z))
    return out


def caller_autocast(device_type: str) -> tuple[torch.dtype, bool] | None:
    """The caller's autocast ``(dtype, cache_enabled)`` on ``device_type`` (``"cpu"`` or
    ``"cuda"``), None when it is off there."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled()


def in_autocast(
    g: Callable[[State], Any], device_type: str, dtype: torch.dtype, cache: bool
) -> Callable[[State], Any]:
    """``g`` run under ``torch.autocast(device_type, dtype, cache_enabled=cache)``: how a solver
    that runs its own arithmetic outside the caller's autocast still evaluates ``g`` inside it."""

    def g_autocast(z: State) -> Any:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=cache):
            return g(z)

    return g_autocast


def under_autocast(f: Callable[..., Any], z: State) -> Callable[..., Any]:
    """The cell a DEQ evaluates for state ``z``: ``f`` itself when the caller's autocast is off
    on ``z``'s device; otherwise ``f`` under that autocast (its dtype and cache setting) with
    its output cast back to ``z``'s dtype (an :class:`AutocastCell` for a module, whose
    parameters the gradient estimators still see), so that the state and the solvers'
    arithmetic keep ``z``'s dtype."""
    device_type = _first(z).device.type
    amp = caller_autocast(device_type)
    if amp is None:
        return f
    dtype, cache = amp
    if isinstance(f, nn.Module) and dtype in LOW_PRECISION_DTYPES:
        return AutocastCell(f, dtype=dtype, device_type=device_type, cache_enabled=cache)

    def cell(state: State, *inputs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=cache):
            out = f(state, *inputs)
        return cast_like(out, state)

    return cell
