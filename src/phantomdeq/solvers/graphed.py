"""Fixed-budget forward solves replayed from a CUDA graph (``DEQ(..., cuda_graph=True)``).

On a GPU a DEQ solve at moderate batch sizes is launch-bound: every iteration launches the
kernels of ``f`` plus a dozen small bookkeeping kernels, each costing microseconds of CPU time
for microseconds of GPU work. A solve with a fixed budget (``tol=0``: exactly ``max_iter``
evaluations, no host synchronisation until it ends) is a fixed sequence of kernels, so it can
be captured once in a CUDA graph and replayed with one launch.

A captured solve reads its inputs from fixed addresses: before each replay the DEQ copies into
static buffers ``z0``, the inputs of ``f`` and every tensor that ``f``'s modules hold as plain
attributes (e.g. dropout masks sampled anew for each solve; during the capture those
attributes point to the static copies). Parameters and buffers are read where they were at
capture time; optimisers update them in place, so that is where they stay. A parameter or
buffer that was *replaced* (a new tensor assigned) is detected at the next call and the solve
is captured again, with a warning.

Capture itself needs CUDA. The code path up to the capture call (static buffers, the cache of
captured solves, the solve run without host synchronisation, the outputs copied out of the
graph's memory) runs on CPU with :class:`EagerCapture`, which executes the recorded function
under :class:`NoHostSync` instead of recording it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .._state import State, StateSpec
from .base import Solution, SolverBase
from .tracker import TrackedSolver, finish_solve

__all__ = [
    "CUDAGraphCapture",
    "CaptureBackend",
    "EagerCapture",
    "GraphedSolves",
    "NoHostSync",
    "check_graphable",
]

#: ops that read a device value on the host (``.item()``, ``bool(t)``) or whose output shape
#: depends on data (a hidden synchronisation on CUDA); none may run inside a captured solve
_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._unique2.default,
}


class NoHostSync(TorchDispatchMode):
    """Dispatch mode that raises ``RuntimeError`` on any op reading tensor data on the host --
    the CPU stand-in for CUDA's refusal to synchronise during stream capture."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _SYNC_OPS:
            raise RuntimeError(
                f"host synchronisation ({func}) inside a captured solve: the solve must read no "
                "tensor value on the host (a fixed budget, tol=0)"
            )
        return func(*args, **(kwargs or {}))


class CaptureBackend(Protocol):
    """Records ``fn`` (which returns a tuple of tensors) once; :meth:`replay` re-executes it
    with the results landing in the tensors the capture returned."""

    def capture(self, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]: ...

    def replay(self) -> None: ...


class CUDAGraphCapture:
    """:class:`CaptureBackend` on ``torch.cuda.CUDAGraph``: ``warmup`` eager runs on a side
    stream (lazy cuBLAS/cuDNN initialisation must not happen during capture), then the capture.
    """

    def __init__(self, *, warmup: int = 2) -> None:
        self.warmup = warmup
        self.graph: Any = None

    def capture(self, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class EagerCapture:
    """:class:`CaptureBackend` for CPU tests: "capture" runs ``fn`` under :class:`NoHostSync`
    and keeps its outputs; "replay" runs it again and copies the results into them (what a
    CUDA graph's replay does to its static outputs). ``captures`` counts the captures."""

    captures = 0

    def __init__(self) -> None:
        self.fn: Callable[[], tuple[Tensor, ...]] | None = None
        self.out: tuple[Tensor, ...] = ()

    def capture(self, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        type(self).captures += 1
        self.fn = fn
        with NoHostSync():
            self.out = fn()
        return self.out

    def replay(self) -> None:
        if self.fn is None:
            raise RuntimeError("EagerCapture.replay before capture")
        with NoHostSync():
            new = self.fn()
        for o, n in zip(self.out, new):
            o.copy_(n)


def _static(value: Any) -> Any:
    """A detached copy of every tensor in ``value`` (tuples/lists kept), the graph's input."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_static(v) for v in value)
    if isinstance(value, list):
        return [_static(v) for v in value]
    return value


def _fill(static: Any, value: Any) -> None:
    if isinstance(static, Tensor):
        static.copy_(value)
    elif isinstance(static, tuple | list):
        for s, v in zip(static, value):
            _fill(s, v)


def _signature(value: Any) -> Any:
    """Hashable description of an input: structure, and per tensor its shape, dtype, device and
    layout; non-tensor values by value (they are baked into the captured graph)."""
    if isinstance(value, Tensor):
        return ("T", tuple(value.shape), value.dtype, value.device, value.stride())
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            "DEQ(cuda_graph=True): the inputs of f must be tensors, tuples/lists of tensors or "
            f"hashable constants, got {type(value).__name__}"
        ) from None
    return ("V", type(value).__name__, value)


def held_tensors(f: Any) -> list[tuple[str, int]]:
    """``(name, data_ptr)`` of the parameters and buffers of ``f``: a captured graph reads them
    at these addresses."""
    if not isinstance(f, nn.Module):
        return []
    found = [(name, p.data_ptr()) for name, p in f.named_parameters()]
    found += [(name, b.data_ptr()) for name, b in f.named_buffers()]
    return found


def held_attributes(f: Any) -> list[tuple[nn.Module, str, Tensor | None]]:
    """``(module, name, value)`` of every plain attribute of ``f``'s modules that holds a tensor
    (or None where another call may put one, e.g. a dropout mask): not a parameter or buffer,
    possibly replaced between calls, so copied into the graph's static copy before a replay."""
    if not isinstance(f, nn.Module):
        return []
    found: list[tuple[nn.Module, str, Tensor | None]] = []
    for mod in f.modules():
        for name, value in vars(mod).items():
            if isinstance(value, Tensor):
                found.append((mod, name, value))
    return found


def _attribute_signature(attrs: list[tuple[nn.Module, str, Tensor | None]]) -> Any:
    return tuple((id(m), n, None if v is None else _signature(v)) for m, n, v in attrs)


class _Captured:
    """One captured solve: static inputs, the backend holding the graph, static outputs."""

    def __init__(
        self,
        solver: SolverBase,
        f: Callable[..., Any],
        z0: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        backend: CaptureBackend,
    ) -> None:
        self.solver = solver
        self.spec = spec
        self.z0 = _static(z0)
        self.inputs = _static(tuple(inputs))
        self.backend = backend
        self.held = held_tensors(f)
        attrs = held_attributes(f)
        self.attributes = [(m, n, v.detach().clone()) for m, n, v in attrs if v is not None]
        self.tracker: Any = None
        static_inputs = self.inputs

        def g(z: State) -> Any:
            return f(z, *static_inputs)

        def run() -> tuple[Tensor, ...]:
            tracker = solver._iterate(g, self.z0, spec, sync_free=True)
            converged, values = tracker.device_values()
            self.tracker = tracker
            return (tracker.best, tracker.best_pair, tracker.nstep, tracker.bad, converged, values)

        # during the capture f's tensor attributes are the static copies
        originals = [getattr(m, n) for m, n, _ in self.attributes]
        try:
            for m, n, static in self.attributes:
                setattr(m, n, static)
            self.out = backend.capture(run)
        finally:
            for (m, n, _), value in zip(self.attributes, originals):
                setattr(m, n, value)

    def solve(self, z0: State, inputs: Sequence[Any]) -> Solution:
        _fill(self.z0, z0)
        _fill(self.inputs, tuple(inputs))
        for m, n, static in self.attributes:
            static.copy_(getattr(m, n))
        self.backend.replay()
        # copies out of the graph's memory: the next replay overwrites it
        best, pair, nstep, bad, converged, values = (t.clone() for t in self.out)
        tracker = self.tracker
        view = _TrackerView(tracker, pair, nstep, bad)
        return finish_solve(view, self.spec, best, converged, values)


class _TrackerView:
    """The fields :func:`~phantomdeq.solvers.tracker.finish_solve` reads, from copies of a
    captured tracker's outputs."""

    def __init__(self, tracker: Any, pair: Tensor, nstep: Tensor, bad: Tensor) -> None:
        self.best_pair = pair
        self.column: int = tracker.column
        self.nstep = nstep
        self.bad = bad
        self.niter: int = tracker.niter
        self.solver: TrackedSolver = tracker.solver


def check_graphable(solver: object, name: str) -> None:
    """Refuse (``ValueError`` naming ``name``) a forward solver whose solve cannot be captured:
    only a library solver with a fixed budget reads nothing on the host until it returns."""
    if not (isinstance(solver, SolverBase) and solver.fixed_budget):
        raise ValueError(
            f"DEQ: cuda_graph=True needs {name} to be a library solver with a fixed "
            f"budget (tol=0, e.g. Anderson(max_iter=22, tol=0)): a convergence test "
            f"reads the device on the host, which a CUDA graph cannot; got {solver!r}"
        )


class GraphedSolves:
    """The captured solves of one DEQ, one per (solver, input signature, autocast state).

    ``backend`` makes a :class:`CaptureBackend` per capture (default: :class:`CUDAGraphCapture`).
    """

    def __init__(self, backend: Callable[[], CaptureBackend] | None = None) -> None:
        self.backend = backend if backend is not None else CUDAGraphCapture
        self._cache: dict[Any, _Captured] = {}
        self._warned = False

    def clear(self) -> None:
        """Drop every captured solve (and the graphs' memory)."""
        self._cache.clear()

    def supports(self, device: torch.device) -> bool:
        """Whether solves on ``device`` are captured: CUDA devices with the CUDA-graph
        backend; every device with another backend (the CPU test path)."""
        return device.type == "cuda" or self.backend is not CUDAGraphCapture

    def __len__(self) -> int:
        return len(self._cache)

    def __call__(
        self, solver: SolverBase, f: Callable[..., Any], z0: State, inputs: Sequence[Any]
    ) -> Solution:
        spec = StateSpec.of(z0)
        dev = spec.device.type
        amp = (
            (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            if dev in ("cpu", "cuda")
            else None
        )
        key = (
            id(solver),
            repr(solver),
            _signature(z0),
            _signature(tuple(inputs)),
            _attribute_signature(held_attributes(f)),
            amp,
        )
        entry = self._cache.get(key)
        if entry is not None:
            now = held_tensors(f)
            if entry.held != now:
                changed = sorted({n for n, _ in entry.held} ^ {n for n, _ in now}) + [
                    n for (n, p), (_, q) in zip(entry.held, now) if p != q
                ]
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"DEQ(cuda_graph=True): parameter(s)/buffer(s) {changed[:5]} of f were "
                        "replaced since the solve was captured; capturing again (update them "
                        "in place, as optimisers do, to keep the graph)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                del self._cache[key]
                entry = None
        if entry is None:
            entry = _Captured(solver, f, z0, inputs, spec, self.backend())
            self._cache[key] = entry
        return entry.solve(z0, inputs)
