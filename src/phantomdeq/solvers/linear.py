"""Shared base of the matrix-free Krylov solvers of the IFT backward system (GMRES, BiCGStab).

Interface. The IFT backward (paper eq. 4) solves ``v = (∂F/∂h)ᵀ v + g``. A fixed-point solver
receives the map ``u -> (∂F/∂h)ᵀ u + g``; a Krylov method needs the *linear operator*
``A = I - (∂F/∂h)ᵀ`` and the right-hand side ``g`` separately. Recovering them from the affine
map (``A v = v - (map(v) - map(0))``) would cost an extra product and could not tell an affine
map from a nonlinear one, so the Krylov solvers implement the :class:`LinearSolver` protocol
instead -- ``solve_linear(op, rhs, x0=None)`` for ``x = op(x) + rhs`` -- which
:class:`~phantomdeq.grad.IFT` recognises (backward and second-order adjoint solves alike).
They are not :class:`~phantomdeq.solvers.Solver` s: a DEQ refuses them as forward solvers.

Batching: each sample has its own Krylov space; every inner product is per sample over the
flattened state (``(B,)`` vectors), every small least-squares or recurrence coefficient per
sample. Breakdowns (a zero denominator) are handled per sample without inf/NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._state import StateSpec
from .._validate import check_int
from ..precision import caller_autocast
from .base import Budgeted, Solution, compute_dtype, sync_free
from .tracker import Tracker

LinearOp = Callable[[Tensor], Tensor]


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products of flat ``(B, D)`` tensors: ``(B,)``."""
    return torch.linalg.vecdot(a, b)


def safe_div(num: Tensor, den: Tensor, ok: Tensor) -> Tensor:
    """``num / den`` where ``ok``, 0 elsewhere (no inf/NaN from the masked entries)."""
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), 0.0)


class LinearSolverBase(Budgeted):
    """Matrix-free solver of ``x = op(x) + rhs``, i.e. ``(I - op) x = rhs``, on flat
    ``(B, D)`` tensors (the :class:`~phantomdeq.solvers.base.LinearSolver` protocol).

    Options (keyword-only): ``max_iter`` (>= 1), the number of products ``op(v)`` (one
    vector-Jacobian product each in the IFT backward) a solve may make; ``tol`` (>= 0) and
    ``stop`` as for the fixed-point solvers: a sample has converged when its residual
    ``‖op(x) + rhs - x‖`` (``stop="abs"``) or that residual over ``‖x‖`` (``"rel"``, the
    convention of every library solver) is ``<= tol``; ``tol=0`` is a fixed budget of exactly
    ``max_iter`` products.

    The returned :class:`~phantomdeq.Solution` has the fixed-point solvers' fields: ``z`` is each
    sample's best iterate, ``abs_residual`` its ``‖(I - op) x - rhs‖``, ``niter`` the number of
    products made, ``nstep`` per sample the products made until its iterate was found,
    ``nonfinite`` the samples that hit inf/NaN (frozen at their best finite iterate). Residuals
    are those of the method's recurrence (equal to the true ones in exact arithmetic),
    re-measured with one product (``rhs - x + op(x)``) whenever the recurrence says the batch
    has converged and at the end of the budget (one product is kept for that), so the reported
    residual of the returned iterate is its true one -- except where a single product is left
    and spent on a last step instead (``max_iter = 1``; GMRES when a re-measurement leaves one
    product), whose residual is the recurrence's. Computations run in float32 for half/bfloat16
    states.
    """

    name = "linear"

    def __init__(self, *, max_iter: int = 30, tol: float = 1e-6, stop: str = "rel") -> None:
        owner = type(self).__name__
        self.max_iter = check_int("max_iter", max_iter, minimum=1, owner=owner)
        self._set_tol_stop(tol, stop, owner)
        # the Tracker's view of the solver: a convergence test at every record
        self.check_every: int | None = 1
        self.freeze_converged = False

    @property
    def reserve(self) -> int:
        """Products kept for re-measuring the final residual (1 when ``max_iter >= 2``)."""
        return 1 if self.max_iter >= 2 else 0

    def solve_linear(self, op: LinearOp, rhs: Tensor, x0: Tensor | None = None) -> Solution:
        """Solve ``x = op(x) + rhs`` from ``x0`` (None: zero, which costs no product) without
        recording an autograd graph; ``op`` maps a ``(B, D)`` tensor of ``rhs``'s dtype to one
        of the same shape and must be linear."""
        if not isinstance(rhs, Tensor) or rhs.dim() != 2 or not rhs.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}.solve_linear: rhs must be a floating (B, D) tensor, got "
                f"{type(rhs).__name__}{tuple(rhs.shape) if isinstance(rhs, Tensor) else ''}"
            )
        if x0 is not None and (not isinstance(x0, Tensor) or x0.shape != rhs.shape):
            raise TypeError(
                f"{type(self).__name__}.solve_linear: x0 must be None or a tensor of rhs's shape "
                f"{tuple(rhs.shape)}, got {type(x0).__name__}"
            )
        if sync_free():
            return _eager_linear(self, op, rhs, x0)
        spec = StateSpec.of(rhs, name="rhs")
        amp = caller_autocast(spec.device.type)
        with torch.no_grad():
            if amp is None:
                return self._run(op, rhs, x0, spec)
            with torch.autocast(spec.device.type, enabled=False):
                device, (dtype, cache) = spec.device.type, amp

                def op_amp(v: Tensor) -> Tensor:
                    with torch.autocast(device, dtype=dtype, cache_enabled=cache):
                        return op(v)

                return self._run(op_amp, rhs, x0, spec)

    def _run(self, op: LinearOp, rhs: Tensor, x0: Tensor | None, spec: StateSpec) -> Solution:
        cdt = compute_dtype(spec.dtype)
        sdt = spec.dtype

        def apply_a(v: Tensor) -> Tensor:  # A v = v - op(v), in the compute dtype
            out = op(v.to(sdt))
            if not isinstance(out, Tensor) or out.shape != v.shape:
                raise TypeError(
                    f"{type(self).__name__}: op must return a tensor of shape "
                    f"{tuple(v.shape)}, got {type(out).__name__}"
                )
            return v - out.to(cdt)

        b = rhs.detach().to(cdt)
        x = torch.zeros_like(b) if x0 is None else x0.detach().to(cdt, copy=True)
        reuse = spec.device.type == "cpu" and not self._workspace_busy
        tracker = Tracker(self, x, workspace=self._workspace if reuse else None)
        if spec.batch > 0 and reuse:
            self._workspace_busy = True  # a nested solve gets its own buffers
            try:
                self._solve(apply_a, b, x, x0 is None, tracker)
            finally:
                self._workspace_busy = False
        elif spec.batch > 0:
            self._solve(apply_a, b, x, x0 is None, tracker)
        return tracker.solution(spec)

    def _solve(
        self, apply_a: LinearOp, b: Tensor, x: Tensor, zero_start: bool, tracker: Tracker
    ) -> None:
        """Iterate on ``A x = b`` (``apply_a`` costs one product), recording iterates in
        ``tracker``; ``zero_start``: ``x`` is zero, its residual ``b`` is known for free."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared steps
    @staticmethod
    def start(
        apply_a: LinearOp, b: Tensor, x: Tensor, zero_start: bool, tracker: Tracker
    ) -> tuple[Tensor, bool]:
        """The initial residual ``r = b - A x`` (free from zero) recorded for ``x``; returns
        ``(r, stop)``."""
        r = b.clone() if zero_start else b - apply_a(x)
        stop = tracker.update(
            x, None, abs_res=torch.linalg.vector_norm(r, dim=1), evals=0 if zero_start else 1
        )
        return r, stop

    def verify(self, apply_a: LinearOp, b: Tensor, tracker: Tracker) -> tuple[Tensor, bool]:
        """Re-measure the residual of every sample's best iterate with one product; returns
        ``(r, stop)`` with ``r = b - A x_best`` (the restart vector when the solve goes on)."""
        r = b - apply_a(tracker.best)
        stop = tracker.remeasure(torch.linalg.vector_norm(r, dim=1))
        return r, stop

    def budget(self, tracker: Tracker) -> int:
        """Products left before the one reserved for the final re-measurement."""
        return self.max_iter - self.reserve - tracker.niter


@torch.compiler.disable
def _eager_linear(
    solver: LinearSolverBase, op: LinearOp, rhs: Tensor, x0: Tensor | None
) -> Solution:
    """``solver.solve_linear(op, rhs, x0)`` outside ``torch.compile``'s tracing."""
    return solver.solve_linear(op, rhs, x0)
