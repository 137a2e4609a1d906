"""Common pieces of the fixed-point solvers: the :class:`Solution` record, option validation and
per-sample best-iterate tracking without a host synchronisation per iteration."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._state import FlatFn, State, StateSpec, make_flat_fn

STOP_MODES = ("abs", "rel")
RESULTS = ("converged", "max_iter", "nonfinite")
#: denominator guard of the relative residual ||g(z) - z|| / ||z||
REL_EPS = 1e-12


@dataclass
class Solution:
    """Outcome of a fixed-point solve ``z = g(z)``.

    Every per-sample field has shape ``(B,)``. ``z`` is the best (lowest-residual) iterate of
    each sample, in the structure of ``z0``. ``residual`` is in the solver's stop mode;
    ``abs_residual`` is ``||g(z) - z||`` and ``rel_residual`` is ``||g(z) - z|| / ||z||`` (the
    paper's ``||h - F(h)|| / ||h||``). ``nstep`` is, per sample, the number of ``g`` evaluations
    until its returned iterate was found. ``trace`` holds the batch-max residual (stop mode) of
    each iteration. ``result`` is ``"converged"`` (every sample reached ``tol``), ``"max_iter"``
    or ``"nonfinite"`` (a non-finite value appeared; the solver stopped there).
    """

    z: State
    nstep: Tensor
    residual: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    converged: Tensor
    trace: list[float] = field(default_factory=list)
    result: str = "max_iter"
    niter: int = 0
    stop: str = "rel"
    tol: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result != "nonfinite"

    def summary(self) -> dict[str, float]:
        """Batch statistics as plain floats (for logs)."""
        return {
            "nstep": float(self.nstep.float().mean()),
            "residual": float(self.residual.float().mean()),
            "residual_max": float(self.residual.float().max()),
            "abs_residual": float(self.abs_residual.float().mean()),
            "rel_residual": float(self.rel_residual.float().mean()),
            "converged": float(self.converged.float().mean()),
            "niter": float(self.niter),
        }


def _check_int(name: str, value: object, *, minimum: int, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_float(
    name: str,
    value: object,
    *,
    owner: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    v = float(value)
    bad = (v <= low if low_open else v < low) or (v >= high if high_open else v > high)
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{owner}: {name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return v


class Solver:
    """Base class. Subclasses implement :meth:`_solve` on flat ``(B, D)`` states.

    ``check_every`` sets how often the convergence test syncs with the host (a GPU stays busy
    in between); ``None`` means every iteration on CPU and every 4 on CUDA.
    """

    name = "solver"

    def __init__(
        self,
        max_iter: int = 30,
        tol: float = 1e-4,
        stop: str = "rel",
        *,
        check_every: int | None = None,
    ) -> None:
        owner = type(self).__name__
        self.max_iter = _check_int("max_iter", max_iter, minimum=1, owner=owner)
        self.tol = _check_float("tol", tol, owner=owner, low=0.0)
        if stop not in STOP_MODES:
            raise ValueError(f"{owner}: stop must be one of {STOP_MODES}, got {stop!r}")
        self.stop = stop
        self.check_every = (
            None
            if check_every is None
            else _check_int("check_every", check_every, minimum=1, owner=owner)
        )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict[str, object]:
        return {"max_iter": self.max_iter, "tol": self.tol, "stop": self.stop}

    def __call__(self, g: Callable[[State], object], z0: State) -> Solution:
        """Solve ``z = g(z)`` from ``z0`` without recording an autograd graph."""
        spec = StateSpec.of(z0)
        with torch.no_grad():
            gf = make_flat_fn(g, spec)
            x0 = spec.flatten(z0).detach().clone()
            tracker = _Tracker(self, x0)
            self._solve(gf, x0, tracker)
            return tracker.solution(spec)

    def solve_flat(self, gf: FlatFn, x0: Tensor) -> tuple[Tensor, _Tracker]:
        """Flat-level entry used by the IFT backward pass: returns the best iterate (B, D)."""
        with torch.no_grad():
            x = x0.detach().clone()
            tracker = _Tracker(self, x)
            self._solve(gf, x, tracker)
            return tracker.best, tracker

    def _solve(self, gf: FlatFn, x0: Tensor, tracker: _Tracker) -> None:
        raise NotImplementedError


class _Tracker:
    """Per-sample residuals, best iterate, step counts and stopping, with few host syncs.

    Contract with the solvers: a tensor passed as ``x`` to :meth:`update` is never modified
    afterwards (the best iterate may be kept by reference instead of copied).
    """

    def __init__(self, solver: Solver, x0: Tensor) -> None:
        self.solver = solver
        b = x0.shape[0]
        dev = x0.device
        self.best = x0
        # best (abs, rel) residual pair per sample; the stop mode picks the column
        self.best_pair = torch.full((b, 2), math.inf, dtype=x0.dtype, device=dev)
        self._col = 0 if solver.stop == "abs" else 1
        self.nstep = torch.zeros(b, dtype=torch.long, device=dev)
        self._trace: list[Tensor] = []
        self._checked = 0
        self._diff: Tensor | None = None
        self.niter = 0
        self.result = "max_iter"
        self.nonfinite = False
        every = solver.check_every
        self.check_every = every if every is not None else (4 if dev.type == "cuda" else 1)

    @property
    def best_res(self) -> Tensor:
        return self.best_pair[:, self._col]

    def update(self, x: Tensor, fx: Tensor, diff: Tensor | None = None) -> bool:
        """Record iterate ``x`` with image ``fx = g(x)`` (``diff = fx - x`` if the solver has it).
        Returns True when the solve must stop. About ten small kernels and, on CPU, one host
        sync; on CUDA a sync only every ``check_every`` iterations."""
        self.niter += 1
        if diff is None:
            if self._diff is None:
                self._diff = torch.empty_like(x)
            diff = torch.sub(fx, x, out=self._diff)
        abs_res = torch.linalg.vector_norm(diff, dim=1)
        denom = torch.linalg.vector_norm(x, dim=1).add_(REL_EPS)
        pair = torch.stack((abs_res, abs_res / denom), dim=1)
        res = pair[:, self._col]
        improved = res < self.best_pair[:, self._col]
        self.best_pair = torch.where(improved[:, None], pair, self.best_pair)
        self.nstep = torch.where(improved, self.niter, self.nstep)
        self._trace.append(res.max())  # NaN/inf propagate: the non-finite test reads the trace
        if self.check_every == 1:
            # a host sync every step is free on CPU: keep the best iterate by reference when the
            # whole batch improved (the usual case), copy per sample only otherwise
            if bool(improved.all()):
                self.best = x
            elif bool(improved.any()):
                self.best = torch.where(improved[:, None], x, self.best)
        else:
            self.best = torch.where(improved[:, None], x, self.best)
        if self.niter % self.check_every == 0 or self.niter >= self.solver.max_iter:
            recent = torch.stack(self._trace[self._checked :])
            self._checked = len(self._trace)
            finite, done = torch.stack(
                (
                    torch.isfinite(recent).all(),
                    (self.best_pair[:, self._col] <= self.solver.tol).all(),
                )
            ).tolist()
            if not finite:
                self.nonfinite = True
                self.result = "nonfinite"
                return True
            if done:
                self.result = "converged"
                return True
        return self.niter >= self.solver.max_iter

    def solution(self, spec: StateSpec) -> Solution:
        trace = torch.stack(self._trace).tolist() if self._trace else []
        return Solution(
            z=spec.unflatten(self.best),
            nstep=self.nstep,
            residual=self.best_pair[:, self._col].clone(),
            abs_residual=self.best_pair[:, 0].clone(),
            rel_residual=self.best_pair[:, 1].clone(),
            converged=self.best_pair[:, self._col] <= self.solver.tol,
            trace=trace,
            result=self.result,
            niter=self.niter,
            stop=self.solver.stop,
            tol=self.solver.tol,
        )
