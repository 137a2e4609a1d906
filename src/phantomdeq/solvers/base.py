"""The solver protocol, the :class:`Solution` record, and the shared machinery of the library's
solvers: option validation, float32 bookkeeping for low-precision states, autocast isolation and
per-sample best-iterate tracking without a host synchronisation per iteration."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .._state import FlatFn, State, StateSpec, make_flat_fn
from .._validate import check_bool, check_choice, check_float, check_int
from ..precision import caller_autocast, in_autocast

# the outcome of a solve, re-exported where the solver protocol names it
from .solution import REL_EPS as REL_EPS
from .solution import Solution as Solution
from .solution import SolveResult as SolveResult
from .tracker import Tracker

STOP_MODES = ("abs", "rel")


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


@runtime_checkable
class LinearSolver(Protocol):
    """A solver of the *linear* fixed point ``x = op(x) + rhs``, i.e. ``(I - op) x = rhs``,
    given the linear map ``op`` on flat ``(B, D)`` tensors (matrix-free: only products ``op(v)``
    are evaluated) -- the system the IFT backward poses, ``v = (∂F/∂h)ᵀ v + g`` (paper eq. 4),
    where ``op`` is the vector-Jacobian product. ``IFT(solver=...)`` recognises it and hands it
    ``op`` and ``rhs`` instead of the map ``u -> op(u) + rhs``. ``x0`` is the initial guess
    (None: zero). Not a :class:`Solver`: a DEQ's forward fixed point is nonlinear."""

    def solve_linear(
        self, op: Callable[[Tensor], Tensor], rhs: Tensor, x0: Tensor | None = None
    ) -> Solution: ...


@runtime_checkable
class InverseSolver(Solver, Protocol):
    """A :class:`Solver` that can also return its estimate ``H`` of the inverse Jacobian of
    the residual ``r(z) = g(z) - z``, ``H ≈ (∂g/∂z - I)⁻¹`` at the solution
    (``Solution.inverse``), for ``grad=SHINE()``: :class:`~phantomdeq.solvers.Broyden`."""

    def solve_with_inverse(self, g: Callable[[State], Any], z0: State) -> Solution: ...


def check_solver(value: object, name: str, *, owner: str) -> Solver:
    """Structural check of the :class:`Solver` protocol (callable with two positional
    arguments); ``TypeError`` naming ``owner`` and ``name`` otherwise. A
    :class:`LinearSolver` (GMRES, BiCGStab) is refused with its own message: it solves only
    the linear IFT backward system."""
    if isinstance(value, type):
        raise TypeError(
            f"{owner}: {name} must be a solver instance, got the class {value.__name__}; "
            f"pass {value.__name__}(...)"
        )
    if isinstance(value, LinearSolver) and not callable(value):
        raise TypeError(
            f"{owner}: {name} {value!r} is a linear solver: it solves only the linear backward "
            f"system of the exact gradient, IFT(solver={type(value).__name__}(...)); the "
            "nonlinear fixed point z = f(z) needs a fixed-point solver (FixedPoint, Anderson, "
            "Broyden)"
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


def sync_free() -> bool:
    """True while ``torch.compile`` traces the solver (dynamo): the iteration must not read
    tensor values on the host there (each read would split the compiled graph)."""
    return bool(torch.compiler.is_compiling())


def into(out: Tensor, value: Callable[..., Tensor], *args: Any) -> Tensor:
    """``value(*args, out=out)`` -- e.g. ``into(G[:, slot], torch.sub, fx, x)`` -- for a
    solver's history slot: written in place, no temporary. While tracing for ``torch.compile``
    (which refuses a strided ``out=``) the slot is assigned ``value(*args)`` instead; the
    compiler fuses the two."""
    if sync_free():
        return out.copy_(value(*args))
    return value(*args, out=out)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- base class


class Budgeted:
    """What every library solver shares, forward (:class:`SolverBase`) and linear
    (:class:`~phantomdeq.solvers.linear.LinearSolverBase`): the ``max_iter``/``tol``/``stop``
    options, their ``repr``, the fixed-budget test and the reusable work buffers (a cache:
    never pickled or deep-copied)."""

    max_iter: int
    tol: float
    stop: str

    def _set_tol_stop(self, tol: float, stop: str, owner: str) -> None:
        self.tol = check_float("tol", tol, owner=owner, low=0.0)
        self.stop = check_choice("stop", stop, STOP_MODES, owner=owner)
        self._workspace: dict[str, Tensor] = {}
        self._workspace_busy = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_workspace"] = {}
        state["_workspace_busy"] = False
        return state

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict[str, object]:
        return {"max_iter": self.max_iter, "tol": self.tol, "stop": self.stop}

    @property
    def fixed_budget(self) -> bool:
        """True when ``tol == 0``: every solve makes exactly ``max_iter`` evaluations (products
        for a linear solver) and reads no tensor value on the host until it returns."""
        return self.tol == 0.0


class SolverBase(Budgeted):
    """Shared base of the library's solvers. Subclasses implement :meth:`_solve` on flat
    ``(B, D)`` states in the compute dtype (:func:`compute_dtype`).

    Options are keyword-only. ``max_iter`` (>= 2) is the number of ``g`` evaluations; the solver
    returns, per sample, the best of the iterates whose residual it measured. ``check_every``
    sets how often the convergence test syncs with the host (a GPU stays busy in between);
    ``None`` means every iteration on CPU and every 4 on CUDA. ``freeze_converged=True`` stops
    each sample on its own: it keeps the first iterate whose residual reaches ``tol`` (as a loop
    that stops every sample separately would) instead of its best one; the batch still iterates
    until every sample has converged. ``tol=0`` is a fixed budget: exactly ``max_iter``
    evaluations and no convergence test (hence no host synchronisation) inside the loop, the
    form that ``torch.compile`` traces into one graph and that
    :class:`~phantomdeq.solvers.CapturedSolve` replays as a CUDA graph.
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
        self._set_tol_stop(tol, stop, owner)
        self.check_every = (
            None
            if check_every is None
            else check_int("check_every", check_every, minimum=1, owner=owner)
        )

    def __call__(self, g: Callable[[State], Any], z0: State) -> Solution:
        """Solve ``z = g(z)`` from ``z0`` without recording an autograd graph.

        The solver's arithmetic runs outside any autocast region of the caller and, for
        half/bfloat16 states, in float32; ``g`` itself runs in the caller's autocast context.
        The outcome is read on the host once, after the loop (:meth:`Tracker.solution`).
        """
        spec = StateSpec.of(z0)
        if sync_free() and not self.fixed_budget:
            # traced by torch.compile with a convergence test: the loop would split the graph
            # at every test and specialise on the iteration counts; run it eagerly instead (one
            # graph break per solve; a cell compiled on its own stays compiled in there)
            return _eager(self, g, z0)
        tracker = self._iterate(g, z0, spec, sync_free=sync_free())
        return tracker.solution(spec)

    def _iterate(
        self,
        g: Callable[[State], Any],
        z0: State,
        spec: StateSpec,
        *,
        sync_free: bool,
        keep_inverse: bool = False,
    ) -> Tracker:
        """Run the iteration; returns the tracker holding the outcome on the device. With
        ``sync_free`` the loop reads no tensor value on the host, except for the convergence
        test every ``check_every`` iterations when ``tol > 0``. ``keep_inverse``: a solver
        with an inverse-Jacobian estimate leaves it in ``tracker.inverse``."""
        amp = caller_autocast(spec.device.type)
        with torch.no_grad():
            if amp is None:
                return self._iterate_flat(g, z0, spec, sync_free, keep_inverse)
            with torch.autocast(spec.device.type, enabled=False):
                g_amp = in_autocast(g, spec.device.type, *amp)
                return self._iterate_flat(g_amp, z0, spec, sync_free, keep_inverse)

    def _iterate_flat(
        self,
        g: Callable[[State], Any],
        z0: State,
        spec: StateSpec,
        sync_free: bool,
        keep_inverse: bool = False,
    ) -> Tracker:
        cdt = compute_dtype(spec.dtype)
        gf = make_flat_fn(g, spec)
        if cdt != spec.dtype:
            gf = _rounding(gf, spec.dtype, cdt)
        if spec.is_tuple:
            x0 = spec.flatten(
                z0, out=torch.empty(spec.batch, spec.dim, dtype=cdt, device=spec.device)
            )
        else:
            x0 = spec.flatten(z0).detach().to(cdt, copy=True)
        # on CPU the large history buffers are kept for the next solve: a fresh multi-MB
        # allocation costs a page fault per 4 KiB on first touch (as much as an f evaluation
        # for Broyden's history at batch 64); not while tracing or in a nested solve
        reuse = spec.device.type == "cpu" and not sync_free and not self._workspace_busy
        workspace = self._workspace if reuse else None
        tracker = Tracker(self, x0, sync_free=sync_free, workspace=workspace)
        tracker.keep_inverse = keep_inverse
        if spec.batch > 0 and reuse:
            self._workspace_busy = True
            try:
                self._solve(gf, x0, tracker)
            finally:
                self._workspace_busy = False
        elif spec.batch > 0:
            self._solve(gf, x0, tracker)
        return tracker

    def _solve(self, gf: FlatFn, x0: Tensor, tracker: Tracker) -> None:
        """Iterate from ``x0`` (B, D), calling ``tracker.update`` once per evaluation of ``gf``
        until it returns True. ``gf(x, out=None)`` may round ``x`` in place to the state's
        dtype (low-precision states): call it before handing ``x`` to the tracker."""
        raise NotImplementedError


@torch.compiler.disable
def _eager(solver: SolverBase, g: Callable[[State], Any], z0: State) -> Solution:
    """``solver(g, z0)`` outside ``torch.compile``'s tracing."""
    return solver(g, z0)
