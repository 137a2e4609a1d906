"""Per-sample bookkeeping of a solve (:class:`Tracker`): residuals, the best iterate, step
counts, non-finite marks and the stopping test, with few host reads; and :func:`finish_solve`,
the one host read that ends a solve and builds its :class:`~phantomdeq.solvers.Solution`.

Used by every library solver (forward and linear) and by the captured solves of
:mod:`phantomdeq.solvers.graphed`; a custom solver need not use it."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from .._state import StateSpec
from .inverse import LowRankInverse
from .solution import REL_EPS, Solution, SolveResult


class TrackedSolver(Protocol):
    """What :class:`Tracker` reads from its solver (a :class:`SolverBase` or a linear
    solver)."""

    max_iter: int
    tol: float
    stop: str
    check_every: int | None
    freeze_converged: bool


class Tracker:
    """Per-sample residuals, best iterate, step counts, non-finite marks and stopping, with few
    host syncs.

    Host reads: the convergence test every ``check_every`` iterations when ``tol > 0`` (never
    with ``tol == 0``, a fixed budget), and on CPU with ``check_every == 1`` one read per
    iteration to keep the best iterate by reference (no copy) when the whole batch improved.
    With ``sync_free`` (tracing for ``torch.compile``, capturing a CUDA graph) the best iterate
    is always selected on the device, so a fixed budget reads nothing until :meth:`solution`.

    Contract with the solvers: a tensor passed as ``x`` to :meth:`update` is never modified
    afterwards (the best iterate may be kept by reference instead of copied).
    """

    def __init__(
        self,
        solver: TrackedSolver,
        x0: Tensor,
        *,
        sync_free: bool = False,
        workspace: dict[str, Tensor] | None = None,
    ) -> None:
        self.solver = solver
        self._workspace = workspace
        b = x0.shape[0]
        dev = x0.device
        self.best = x0
        # best (abs, rel) residual pair per sample; the stop mode picks the column
        self.best_pair = torch.full((b, 2), math.inf, dtype=x0.dtype, device=dev)
        self.column = 0 if solver.stop == "abs" else 1
        self.nstep = torch.zeros(b, dtype=torch.long, device=dev)
        self.bad = torch.zeros(b, dtype=torch.bool, device=dev)
        self._trace: list[Tensor] = []
        self._diff: Tensor | None = None
        self.niter = 0
        self.stopped = False  # the convergence test ended the loop before max_iter
        every = solver.check_every
        self.check_every = every if every is not None else (4 if dev.type == "cuda" else 1)
        self._checks = solver.tol > 0.0
        self._by_reference = self.check_every == 1 and not sync_free
        #: set by the caller when the solver must leave its inverse-Jacobian estimate in
        #: :attr:`inverse` (Broyden for ``grad=SHINE()``)
        self.keep_inverse = False
        self.inverse: LowRankInverse | None = None

    def buffer(self, name: str, *shape: int, like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device for the solver's
        own bookkeeping (history buffers), reused between solves on CPU. Never hand it to
        :meth:`update` as ``x``: it is overwritten by the next solve."""
        if self._workspace is None:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        need = math.prod(shape)
        buf = self._workspace.get(name)
        if (
            buf is None
            or buf.dtype != like.dtype
            or buf.device != like.device
            or buf.numel() < need
        ):
            self._workspace.pop(name, None)  # free the old one before allocating
            buf = torch.empty(need, dtype=like.dtype, device=like.device)
            self._workspace[name] = buf
        return buf[:need].view(shape)

    @property
    def best_res(self) -> Tensor:
        return self.best_pair[:, self.column]

    @property
    def last(self) -> bool:
        """True when the next :meth:`update` is the last one the budget allows."""
        return self.niter + 1 >= self.solver.max_iter

    def update(
        self,
        x: Tensor,
        fx: Tensor | None,
        diff: Tensor | None = None,
        *,
        abs_res: Tensor | None = None,
        evals: int = 1,
    ) -> bool:
        """Record iterate ``x`` with image ``fx = g(x)``; a solver that has ``diff = fx - x``
        or its per-sample norm ``abs_res`` (e.g. from a Gram matrix) passes it instead, and
        ``fx`` may then be None. ``evals``: the evaluations spent since the previous record
        (a linear solver records an iterate after several products, or one for free).
        Returns True when the solve must stop: ``max_iter`` evaluations, or every sample
        converged or non-finite at a convergence test. About fifteen kernels on ``(B,)``
        vectors plus the norm(s) over the state."""
        self.niter += evals
        if abs_res is None:
            if diff is None:
                if fx is None:
                    raise TypeError("Tracker.update: pass fx, diff or abs_res")
                if self._diff is None:
                    self._diff = self.buffer("tracker_diff", *x.shape, like=x)
                diff = torch.sub(fx, x, out=self._diff)
            abs_res = torch.linalg.vector_norm(diff, dim=1)
        xnorm = torch.linalg.vector_norm(x, dim=1)
        tol = self.solver.tol
        best_res = self.best_pair[:, self.column]
        # a sample is non-finite once its iterate or its image holds inf/NaN before it has
        # converged (a converged sample keeps its solution); from then on it stays frozen
        healthy = torch.isfinite(abs_res + xnorm).logical_or_(best_res <= tol)
        self.bad = self.bad | healthy.logical_not_()
        pair = torch.stack((abs_res, abs_res / xnorm.add_(REL_EPS)), dim=1)
        res = pair[:, self.column]
        improved = (res < best_res).logical_and_(self.bad.logical_not())
        if self.solver.freeze_converged:
            improved.logical_and_(best_res > tol)
        self.best_pair = torch.where(improved[:, None], pair, self.best_pair)
        self.nstep = torch.where(improved, self.niter, self.nstep)
        self._trace.append(res.masked_fill(self.bad, -math.inf).amax())
        if self._by_reference:
            # a host read per step is free on CPU: keep the best iterate by reference when the
            # whole batch improved (the usual case), select per sample only otherwise
            if bool(improved.all()):
                self.best = x
            elif bool(improved.any()):
                self.best = torch.where(improved[:, None], x, self.best)
        else:
            self.best = torch.where(improved[:, None], x, self.best)
        if self.niter >= self.solver.max_iter:
            return True
        if self._checks and self.niter % self.check_every == 0:
            done = (self.best_pair[:, self.column] <= tol).logical_or_(self.bad)
            if bool(done.all()):
                self.stopped = True
                return True
        return False

    def remeasure(self, abs_res: Tensor, *, evals: int = 1) -> bool:
        """Replace the recorded residual of every sample's best iterate by ``abs_res``, its
        residual measured anew (a linear solver's recurrence residual drifts from the true one
        in floating point), after ``evals`` evaluations. Non-finite values mark the sample.
        Returns True when the solve must stop, as :meth:`update`."""
        self.niter += evals
        xnorm = torch.linalg.vector_norm(self.best, dim=1)
        healthy = torch.isfinite(abs_res + xnorm)
        self.bad = self.bad | healthy.logical_not()
        pair = torch.stack((abs_res, abs_res / xnorm.add_(REL_EPS)), dim=1)
        self.best_pair = torch.where(self.bad[:, None], self.best_pair, pair)
        self._trace.append(pair[:, self.column].masked_fill(self.bad, -math.inf).amax())
        self.stopped = False
        if self.niter >= self.solver.max_iter:
            return True
        if self._checks:
            done = (self.best_pair[:, self.column] <= self.solver.tol).logical_or_(self.bad)
            if bool(done.all()):
                self.stopped = True
                return True
        return False

    def outcome(self) -> tuple[Tensor, Tensor]:
        """``(converged, flags)`` on the device: per-sample convergence and a float vector
        ``[any sample non-finite, every sample converged or non-finite]``."""
        reached = self.best_pair[:, self.column] <= self.solver.tol
        converged = reached & ~self.bad
        flags = torch.stack((self.bad.any(), (reached | self.bad).all()))
        return converged, flags.to(self.best_pair.dtype)

    def device_values(self) -> tuple[Tensor, Tensor]:
        """``(converged, values)`` on the device, what :func:`finish_solve` reads on the host:
        per-sample convergence and the trace followed by the two :meth:`outcome` flags."""
        converged, flags = self.outcome()
        values = torch.cat((torch.stack(self._trace), flags)) if self._trace else flags
        return converged, values

    def solution(self, spec: StateSpec, *, best: Tensor | None = None) -> Solution:
        """The :class:`Solution`; one host read for the trace and the outcome flags (``best``
        replaces the tracked best iterate, e.g. a copy out of a CUDA graph's memory)."""
        converged, values = self.device_values()
        sol = finish_solve(self, spec, self.best if best is None else best, converged, values)
        if self.inverse is not None:
            # a non-finite sample's factors may hold inf/NaN: its estimate becomes -I
            bad = sol.result is SolveResult.NONFINITE
            sol.inverse = self.inverse.without(self.bad) if bad else self.inverse
        return sol


class TrackedOutcome(Protocol):
    """What :func:`finish_solve` reads from a :class:`Tracker` (or from copies of a captured
    tracker's outputs)."""

    best_pair: Tensor
    column: int
    nstep: Tensor
    bad: Tensor
    niter: int
    solver: TrackedSolver


@torch.compiler.disable
def finish_solve(
    tracker: TrackedOutcome, spec: StateSpec, best: Tensor, converged: Tensor, values: Tensor
) -> Solution:
    """The host read that ends a solve and the :class:`Solution` built from it. Never traced
    by ``torch.compile``: the values read (trace, outcome) would become guards of the code
    after them and recompile it at every solve."""
    *raw, any_bad, all_done = values.tolist()
    # -inf in the trace marks an iteration where every sample was non-finite
    trace = [math.nan if v == -math.inf else v for v in raw]
    if any_bad:
        result = SolveResult.NONFINITE
    elif all_done:
        result = SolveResult.CONVERGED
    else:
        result = SolveResult.MAX_ITER
    col = tracker.best_pair[:, tracker.column]
    return Solution(
        z=spec.unflatten(best.to(spec.dtype)),
        nstep=tracker.nstep,
        residual=col.clone(),
        abs_residual=tracker.best_pair[:, 0].clone(),
        rel_residual=tracker.best_pair[:, 1].clone(),
        converged=converged,
        nonfinite=tracker.bad,
        trace=trace,
        result=result,
        niter=tracker.niter,
        stop=tracker.solver.stop,
        tol=tracker.solver.tol,
    )
