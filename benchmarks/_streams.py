"""Counting the state streams a solver makes: every ATen operation a solve runs outside ``f``,
seen through a ``TorchDispatchMode``, with the whole states it reads and writes.

One *stream* is one read or one write of a ``(B, D)`` state. An operation reads each tensor
argument and writes each tensor it returns (an ``out=`` argument is written, not read; ``copy_``
and ``fill_`` do not read their destination; an in-place operation reads and writes its
target); a tensor of ``k (B, D)`` elements counts ``k`` (a ``(B, n, D)`` history view counts
``n``), a tensor smaller than one state counts nothing (the per-sample scalars and small
matrices), and views (``view``, ``transpose``, slicing) move no data and count nothing. Each
operand of a product counts on its own, also when one is part of the other (the row
``R[:, j]`` of a product with ``R[:, :n]`` counts 1 + n), as in ``state_passes.py``.

Used by ``state_passes.py`` (the counts its floor uses) and by ``tests/test_state_passes.py``
(the counts its docstring states)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: operations whose first argument is written without being read
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_"}
#: operations that move no data (an allocation is not a pass over memory)
_NO_DATA = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


class StreamCounter(TorchDispatchMode):
    """Sums the state streams of the operations run under it, outside :meth:`paused` regions
    (the evaluations of ``f``), split into segments at each :meth:`mark` (one per evaluation).
    ``state_numel``: the number of elements of one state ``(B, D)``."""

    def __init__(self, state_numel: int) -> None:
        super().__init__()
        self.unit = state_numel
        self.segments: list[float] = [0.0]
        self.ops: list[list[tuple[str, float]]] = [[]]
        self._paused = 0

    def mark(self) -> None:
        self.segments.append(0.0)
        self.ops.append([])

    def paused(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` whose own operations are not counted, and that opens a new segment."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.mark()
            self._paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._paused -= 1

        return wrapped

    def _states(self, t: object) -> float:
        if not isinstance(t, torch.Tensor) or t.numel() < self.unit:
            return 0.0
        return t.numel() / self.unit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        schema = func._schema
        name = schema.name.split("::")[-1]
        if name in _NO_DATA or any(
            r.alias_info is not None and not r.alias_info.is_write for r in schema.returns
        ):
            return out  # a view or an allocation: no data moved
        streams = 0.0
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written = arg.alias_info is not None and arg.alias_info.is_write
            if written and (arg.kwarg_only or (i == 0 and name in _WRITE_ONLY_SELF)):
                continue  # out= or a destination: written (counted with the returns), not read
            for t in tree_flatten(value)[0]:
                streams += self._states(t)
        for t in tree_flatten(out)[0]:
            streams += self._states(t)
        if streams:
            self.segments[-1] += streams
            self.ops[-1].append((str(func), streams))
        return out


def count_solve(solver: Any, f: Callable[[Any], Any], z0: torch.Tensor) -> StreamCounter:
    """Run ``solver(f, z0)`` (no autograd) under a :class:`StreamCounter` with ``f`` paused:
    ``segments[0]`` is the setup before the first evaluation, ``segments[k]`` the solver's
    work after evaluation ``k`` (up to the next one, or to the end of the solve)."""
    counter = StreamCounter(z0.numel())
    g = counter.paused(f)
    with torch.no_grad(), counter:
        solver(g, z0)
    return counter
