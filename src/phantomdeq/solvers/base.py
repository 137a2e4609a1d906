"""The solver protocol, the :class:`Solution` record, and the shared machinery of the library's
solvers: option validation, float32 bookkeeping for low-precision states, autocast isolation and
per-sample best-iterate tracking without a host synchronisation per iteration."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .._state import FlatFn, State, StateSpec, make_flat_fn
from .._validate import check_bool, check_choice, check_float, check_int

STOP_MODES = ("abs", "rel")
#: denominator guard of the relative residual ||g(z) - z|| / (||z|| + REL_EPS); the residuals are
#: computed in float32 or wider (see :func:`compute_dtype`), where it neither underflows nor
#: changes a relative residual of a state of norm >= 1e-6 by more than 1e-6.
REL_EPS = 1e-12


class SolveResult(str, Enum):
    """Outcome of a solve. A ``str`` subclass: ``sol.result == "converged"`` works."""

    CONVERGED = "converged"  #: every sample reached ``tol``
    MAX_ITER = "max_iter"  #: the iteration budget ran out first
    NONFINITE = "nonfinite"  #: at least one sample hit inf/NaN (see ``Solution.nonfinite``)

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


@dataclass
class Solution:
    """Outcome of a fixed-point solve ``z = g(z)``.

    Every per-sample field has shape ``(B,)``. ``z`` is the best (lowest-residual) iterate of
    each sample, in the structure and dtype of ``z0``. ``residual`` is in the solver's stop mode;
    ``abs_residual`` is ``||g(z) - z||`` and ``rel_residual`` is ``||g(z) - z|| / ||z||`` (the
    paper's ``||h - F(h)|| / ||h||``), in float32 for half/bfloat16 states (the solvers' own
    precision). ``nstep`` is, per sample, the number of ``g`` evaluations until its returned
    iterate was found. ``converged`` is ``residual <= tol`` per sample. ``nonfinite`` marks the
    samples that hit inf/NaN: each was frozen at that point (its ``z``, residuals and ``nstep``
    are those of its best finite iterate; a residual stays ``inf`` if none was ever measured,
    ``converged`` is False) while the rest of the batch kept iterating. ``trace`` holds, per
    iteration, the largest residual (stop mode) over the samples not marked non-finite.
    ``result`` is a :class:`SolveResult`: ``"converged"`` (every sample reached ``tol``),
    ``"max_iter"`` or ``"nonfinite"`` (some sample is marked in ``nonfinite``). ``backward``
    is set on a DEQ's forward ``info`` when ``grad=IFT(...)`` runs its backward solve: that
    solve's own :class:`Solution` (None until then, and for the other estimators).
    """

    z: State
    nstep: Tensor
    residual: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    converged: Tensor
    nonfinite: Tensor | None = None
    trace: list[float] = field(default_factory=list)
    result: SolveResult = SolveResult.MAX_ITER
    niter: int = 0
    stop: str = "rel"
    tol: float = 0.0
    backward: Solution | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.result, SolveResult):
            if not isinstance(self.result, str):
                raise TypeError(
                    f"Solution.result must be a SolveResult or one of "
                    f"{[r.value for r in SolveResult]}, got {type(self.result).__name__}"
                )
            try:
                self.result = SolveResult(self.result)
            except ValueError:
                raise ValueError(
                    f"Solution.result must be one of {[r.value for r in SolveResult]}, "
                    f"got {self.result!r}"
                ) from None
        if self.nonfinite is None:
            self.nonfinite = torch.full_like(
                self.converged, self.result is SolveResult.NONFINITE, dtype=torch.bool
            )


@runtime_checkable
class Solver(Protocol):
    """What :class:`~phantomdeq.DEQ` needs from a solver: any object with
    ``__call__(g, z0) -> Solution`` that solves ``z = g(z)`` from ``z0`` (a tensor or a tuple of
    tensors with a leading batch dimension) and returns a :class:`Solution` whose ``z`` has
    ``z0``'s structure. The DEQ attaches its gradient afterwards, so a solver need not (and the
    library's :class:`SolverBase` solvers do not) record an autograd graph."""

    def __call__(self, g: Callable[[State], Any], z0: State) -> Solution: ...


@runtime_checkable
class UnrollingSolver(Solver, Protocol):
    """A :class:`Solver` that can also run its iteration differentiably (for ``grad=BPTT()``):
    ``unroll(g, z0) -> (z, Solution)`` with ``z`` carrying the autograd graph of the iterations."""

    def unroll(self, g: Callable[[State], Any], z0: State) -> tuple[State, Solution]: ...


def check_solver(value: object, name: str, *, owner: str) -> Solver:
    """Structural check of the :class:`Solver` protocol (callable with two positional
    arguments); ``TypeError`` naming ``owner`` and ``name`` otherwise."""
    if isinstance(value, type):
        raise TypeError(
            f"{owner}: {name} must be a solver instance, got the class {value.__name__}; "
            f"pass {value.__name__}(...)"
        )
    if not callable(value):
        raise TypeError(
            f"{owner}: {name} must be a solver (an object with __call__(g, z0) -> Solution, "
            f"e.g. phantomdeq.Anderson()), got {type(value).__name__} {value!r}"
        )
    try:
        sig = inspect.signature(value)
    except (TypeError, ValueError):  # builtins without a signature: accept
        return value  # type: ignore[return-value]
    try:
        sig.bind(None, None)
    except TypeError:
        raise TypeError(
            f"{owner}: {name} must accept two positional arguments (g, z0), got a callable "
            f"with signature {sig}"
        ) from None
    return value  # type: ignore[return-value]


# ---------------------------------------------------------------------------- precision


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the solvers' arithmetic for a state of ``dtype``: the state's own dtype for
    float32/float64, float32 for half and bfloat16 (norms, residuals, Anderson's Gram matrix and
    small solve, Broyden's updates)."""
    return torch.promote_types(dtype, torch.float32)


def _rounding(gf: FlatFn, dtype: torch.dtype, cdt: torch.dtype) -> FlatFn:
    """``gf`` (on ``dtype``) seen from a float32 (``cdt``) solver: the iterate is rounded to the
    state's dtype *in place* before ``g`` sees it, so the recorded iterate is exactly the point
    ``g`` was evaluated at and the residuals are exact for the returned (state-dtype) solution."""

    def gf_low(x: Tensor, out: Tensor | None = None) -> Tensor:
        xl = x.to(dtype)
        x.copy_(xl)
        y = gf(xl)
        if out is not None:
            return out.copy_(y)
        return y.to(cdt)

    return gf_low


@contextlib.contextmanager
def _no_caller_autocast(
    device_type: str, g: Callable[[State], Any]
) -> Iterator[Callable[[State], Any]]:
    """Disable the caller's autocast for the solver's own arithmetic, and return ``g`` wrapped so
    that it still runs in the caller's autocast context. Free when autocast is off."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        yield g
        return
    dtype = torch.get_autocast_dtype(device_type)
    cache = torch.is_autocast_cache_enabled()

    def g_autocast(z: State) -> Any:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=cache):
            return g(z)

    with torch.autocast(device_type, enabled=False):
        yield g_autocast


# ---------------------------------------------------------------------------- base class


class SolverBase:
    """Shared base of the library's solvers. Subclasses implement :meth:`_solve` on flat
    ``(B, D)`` states in the compute dtype (:func:`compute_dtype`).

    Options are keyword-only. ``max_iter`` (>= 2) is the number of ``g`` evaluations; the solver
    returns, per sample, the best of the iterates whose residual it measured. ``check_every``
    sets how often the convergence test syncs with the host (a GPU stays busy in between);
    ``None`` means every iteration on CPU and every 4 on CUDA. ``freeze_converged=True`` stops
    each sample on its own: it keeps the first iterate whose residual reaches ``tol`` (as a loop
    that stops every sample separately would) instead of its best one; the batch still iterates
    until every sample has converged.
    """

    name = "solver"

    def __init__(
        self,
        *,
        max_iter: int = 30,
        tol: float = 1e-4,
        stop: str = "rel",
        check_every: int | None = None,
        freeze_converged: bool = False,
    ) -> None:
        owner = type(self).__name__
        self.freeze_converged = check_bool("freeze_converged", freeze_converged, owner=owner)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int):
            raise TypeError(
                f"{owner}: max_iter must be an integer >= 2, got {type(max_iter).__name__} "
                f"{max_iter!r}"
            )
        if max_iter < 2:
            raise ValueError(
                f"{owner}: max_iter must be an integer >= 2, got {max_iter}: a solve returns "
                "the best iterate whose residual ||g(z) - z|| it measured, and with one "
                "evaluation of g the only such iterate is z0 itself (the map's input would be "
                "ignored). max_iter=2 returns g(z0) whenever its residual is the smaller one."
            )
        self.max_iter = max_iter
        self.tol = check_float("tol", tol, owner=owner, low=0.0)
        self.stop = check_choice("stop", stop, STOP_MODES, owner=owner)
        self.check_every = (
            None
            if check_every is None
            else check_int("check_every", check_every, minimum=1, owner=owner)
        )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict[str, object]:
        return {"max_iter": self.max_iter, "tol": self.tol, "stop": self.stop}

    def __call__(self, g: Callable[[State], Any], z0: State) -> Solution:
        """Solve ``z = g(z)`` from ``z0`` without recording an autograd graph.

        The solver's arithmetic runs outside any autocast region of the caller and, for
        half/bfloat16 states, in float32; ``g`` itself runs in the caller's autocast context.
        """
        spec = StateSpec.of(z0)
        cdt = compute_dtype(spec.dtype)
        with torch.no_grad(), _no_caller_autocast(spec.device.type, g) as g_in:
            gf = make_flat_fn(g_in, spec)
            if cdt != spec.dtype:
                gf = _rounding(gf, spec.dtype, cdt)
            if spec.is_tuple:
                x0 = spec.flatten(
                    z0, out=torch.empty(spec.batch, spec.dim, dtype=cdt, device=spec.device)
                )
            else:
                x0 = spec.flatten(z0).detach().to(cdt, copy=True)
            tracker = _Tracker(self, x0)
            if spec.batch > 0:
                self._solve(gf, x0, tracker)
            return tracker.solution(spec)

    def _solve(self, gf: FlatFn, x0: Tensor, tracker: _Tracker) -> None:
        """Iterate from ``x0`` (B, D), calling ``tracker.update`` once per evaluation of ``gf``
        until it returns True. ``gf(x, out=None)`` may round ``x`` in place to the state's
        dtype (low-precision states): call it before handing ``x`` to the tracker."""
        raise NotImplementedError


class _Tracker:
    """Per-sample residuals, best iterate, step counts, non-finite marks and stopping, with few
    host syncs.

    Contract with the solvers: a tensor passed as ``x`` to :meth:`update` is never modified
    afterwards (the best iterate may be kept by reference instead of copied).
    """

    def __init__(self, solver: SolverBase, x0: Tensor) -> None:
        self.solver = solver
        b = x0.shape[0]
        dev = x0.device
        self.best = x0
        # best (abs, rel) residual pair per sample; the stop mode picks the column
        self.best_pair = torch.full((b, 2), math.inf, dtype=x0.dtype, device=dev)
        self._col = 0 if solver.stop == "abs" else 1
        self.nstep = torch.zeros(b, dtype=torch.long, device=dev)
        self.bad = torch.zeros(b, dtype=torch.bool, device=dev)
        self._trace: list[Tensor] = []
        self._diff: Tensor | None = None
        self.niter = 0
        self.result = SolveResult.CONVERGED if b == 0 else SolveResult.MAX_ITER
        every = solver.check_every
        self.check_every = every if every is not None else (4 if dev.type == "cuda" else 1)

    @property
    def best_res(self) -> Tensor:
        return self.best_pair[:, self._col]

    def update(self, x: Tensor, fx: Tensor, diff: Tensor | None = None) -> bool:
        """Record iterate ``x`` with image ``fx = g(x)`` (``diff = fx - x`` if the solver has it).
        Returns True when the solve must stop: every sample converged or non-finite, or
        ``max_iter``. A dozen kernels on ``(B,)`` vectors and, on CPU, a host sync; on CUDA a
        sync only every ``check_every`` iterations."""
        self.niter += 1
        if diff is None:
            if self._diff is None:
                self._diff = torch.empty_like(x)
            diff = torch.sub(fx, x, out=self._diff)
        abs_res = torch.linalg.vector_norm(diff, dim=1)
        xnorm = torch.linalg.vector_norm(x, dim=1)
        # a sample is non-finite once its iterate or its image holds inf/NaN before it has
        # converged (a converged sample keeps its solution); from then on it stays frozen
        best_res = self.best_pair[:, self._col]
        self.bad = self.bad | ~(torch.isfinite(abs_res + xnorm) | (best_res <= self.solver.tol))
        pair = torch.stack((abs_res, abs_res / xnorm.add_(REL_EPS)), dim=1)
        res = pair[:, self._col]
        improved = (res < best_res) & ~self.bad
        if self.solver.freeze_converged:
            improved &= best_res > self.solver.tol
        self.best_pair = torch.where(improved[:, None], pair, self.best_pair)
        self.nstep = torch.where(improved, self.niter, self.nstep)
        self._trace.append(res.masked_fill(self.bad, -math.inf).max())
        if self.check_every == 1:
            # a host sync every step is free on CPU: keep the best iterate by reference when the
            # whole batch improved (the usual case), copy per sample only otherwise
            if bool(improved.all()):
                self.best = x
            elif bool(improved.any()):
                self.best = torch.where(improved[:, None], x, self.best)
        else:
            self.best = torch.where(improved[:, None], x, self.best)
        last = self.niter >= self.solver.max_iter
        if self.niter % self.check_every == 0 or last:
            done = bool(((self.best_pair[:, self._col] <= self.solver.tol) | self.bad).all())
            if done:
                self.result = SolveResult.CONVERGED
                return True
        return last

    def solution(self, spec: StateSpec) -> Solution:
        # one host sync for the trace and the non-finite flag; -inf in the trace marks an
        # iteration where every sample was non-finite
        flag = self.bad.any().to(self.best_pair.dtype)
        *raw, any_bad = torch.stack([*self._trace, flag]).tolist()
        trace = [math.nan if v == -math.inf else v for v in raw]
        converged = (self.best_pair[:, self._col] <= self.solver.tol) & ~self.bad
        result = SolveResult.NONFINITE if any_bad else self.result
        return Solution(
            z=spec.unflatten(self.best.to(spec.dtype)),
            nstep=self.nstep,
            residual=self.best_pair[:, self._col].clone(),
            abs_residual=self.best_pair[:, 0].clone(),
            rel_residual=self.best_pair[:, 1].clone(),
            converged=converged,
            nonfinite=self.bad,
            trace=trace,
            result=result,
            niter=self.niter,
            stop=self.solver.stop,
            tol=self.solver.tol,
        )
