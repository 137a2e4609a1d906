"""Fixed-point correction (Bai, Geng, Koltun & Kolter, "Deep Equilibrium Optical Flow
Estimation", CVPR 2022): supervise several states along the forward solver's trajectory.

With ``Correction(states=N, gamma=γ)`` on a :class:`~phantomdeq.DEQ`, the forward solve records
``N − 1`` states of its trajectory (the inputs of evaluations of ``F`` evenly spaced over the
evaluations it made, however early it stopped: :class:`StateRecorder`) and the DEQ
returns, besides the solution, the list ``info.states = [s_1, …, s_{N−1}, h*]`` with weights
``info.state_weights = [γ^{N−1}, …, γ, 1]``. Each earlier state carries the unrolled phantom
gradient from that state (``UPG`` with the estimator's ``k`` and ``λ``, eq. 17 with ``h_0 = s_m``);
the last one is the DEQ's output with its own estimator. The loss to minimise is the weighted
sum of the per-state losses, ``Σ_m w_m L(head(s_m))`` (:func:`corrected_loss`); its gradient is
the weighted sum of the per-state phantom gradients. ``states=1`` is the plain estimator.

``mode="sliced"`` is TorchDEQ's ``DEQSliced`` (DEQ-Flow's segmented solve) instead: the solve
runs in ``N`` segments of ``max_iter // N`` evaluations each (:meth:`Correction.segments`);
after each segment but the last, ``UPG(k, λ)`` is unrolled from its detached result, that state
is supervised, and the next segment's solve starts from its value (detached: no gradient
flows from one segment into the next); the last segment's result gets the DEQ's own
estimator. The unroll steps are part of the trajectory (``max_iter + (N − 1) k`` evaluations
in all). ``info`` is the last segment's :class:`~phantomdeq.Solution`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .._state import State, detach
from .._validate import check_choice, check_float, check_int
from ..errors import CorrectionError
from ..solvers.base import Solution
from .base import GradientEstimator

if TYPE_CHECKING:
    from ..forward import ForwardPass

__all__ = ["CORRECTION_MODES", "Correction", "corrected_loss"]

#: ``sampled``: states along one solve (TorchDEQ's ``DEQIndexing``); ``sliced``: a solve in
#: segments, each supervised (``DEQSliced``)
CORRECTION_MODES = ("sampled", "sliced")


class Correction:
    """Fixed-point correction: ``states`` supervised states (>= 1; 1 = off), loss weights
    ``γ^m`` for the state ``m`` places before the solution (``0 < gamma <= 1``); ``mode``
    ``"sampled"`` (states along one solve) or ``"sliced"`` (a solve in segments, see the
    module docstring)."""

    def __init__(self, *, states: int = 1, gamma: float = 0.8, mode: str = "sampled") -> None:
        self.states = check_int("states", states, minimum=1, owner="Correction")
        self.gamma = check_float(
            "gamma", gamma, owner="Correction", low=0.0, high=1.0, low_open=True
        )
        self.mode = check_choice("mode", mode, CORRECTION_MODES, owner="Correction")

    def __repr__(self) -> str:
        extra = "" if self.mode == "sampled" else f", mode={self.mode!r}"
        return f"Correction(states={self.states}, gamma={self.gamma}{extra})"

    @property
    def sliced(self) -> bool:
        """True for an active correction in ``"sliced"`` mode."""
        return self.active and self.mode == "sliced"

    def segments(self, max_iter: int) -> list[int]:
        """The evaluation budget of each segment of a sliced solve: ``max_iter // N`` each (as
        TorchDEQ's ``DEQSliced`` with ``n_states = N``)."""
        return [max_iter // self.states] * self.states

    @property
    def active(self) -> bool:
        return self.states > 1

    def weights(self) -> list[float]:
        """``[γ^{N−1}, …, γ, 1]``: earliest state first, the solution last."""
        n = self.states
        return [self.gamma ** (n - 1 - m) for m in range(n)]

    def evaluations(self, max_iter: int) -> list[int]:
        """The (1-based) evaluations of ``F`` whose inputs are recorded by a solve that makes
        ``max_iter`` evaluations: ``⌊m T / N⌋ + 1`` for ``m = 1 … N − 1`` with ``T = max_iter``
        (for an undamped fixed-point iteration from ``z0`` the input of evaluation ``e`` is the
        iterate after ``e − 1`` updates). A solve that stops early is spaced over the
        evaluations it made (:class:`StateRecorder`)."""
        n = self.states
        return [m * max_iter // n + 1 for m in range(1, n)]

    def recorder(self, g: Callable[[State], Any], max_iter: int) -> StateRecorder:
        return StateRecorder(g, self.states, max_iter)

    def check(
        self, grad: GradientEstimator, solvers: Sequence[tuple[str, object]], *, cuda_graph: bool
    ) -> None:
        """What an active correction needs from a DEQ: an estimator with a
        :meth:`~phantomdeq.grad.GradientEstimator.correction_estimator` (UPG, NPG), no replayed
        solve, and solvers (``(name, solver)`` pairs) with an integer ``max_iter``."""
        if not self.active:
            return
        state_estimator(grad)
        if cuda_graph:
            raise ValueError(
                "DEQ: correction records states inside the solve, which cuda_graph=True "
                "replays from a captured graph; use cuda_graph=False"
            )
        for name, chosen in solvers:
            budget = getattr(chosen, "max_iter", None)
            if isinstance(budget, bool) or not isinstance(budget, int):
                raise TypeError(
                    f"DEQ: correction spaces its states over the {name}'s budget and needs "
                    f"a solver with an integer max_iter, got {chosen!r}"
                )
            if self.mode == "sliced" and budget // self.states < 2:
                raise ValueError(
                    f"DEQ: Correction(states={self.states}, mode='sliced') solves in "
                    f"{self.states} segments of {name}.max_iter // {self.states} evaluations, "
                    f"at least 2 each; {name}.max_iter={budget} gives {budget // self.states}: "
                    f"raise max_iter to {2 * self.states} or more, or use fewer states"
                )

    def record(self, fp: ForwardPass, grad: GradientEstimator) -> StateRecorder | None:
        """Record the states of the forward pass ``fp``: its solve then calls the recorder.
        None for an estimator that back-propagates through the solve itself (nothing is
        recorded; ``info.states`` stays None)."""
        if grad.tracks_forward:
            return None
        budget = getattr(fp.solver, "max_iter", None)
        if isinstance(budget, bool) or not isinstance(budget, int):  # replaced since
            raise TypeError(f"DEQ: correction needs a solver with max_iter, got {fp.solver!r}")
        recorder = self.recorder(fp.g, budget)
        fp.record = recorder
        return recorder

    def attach_states(
        self,
        grad: GradientEstimator,
        fp: ForwardPass,
        recorder: StateRecorder,
        sol: Solution,
        z: State,
    ) -> None:
        """``sol.states``: the recorded states, each with the unrolled phantom gradient of
        ``grad`` from there, then ``z``; ``sol.state_weights``: :meth:`weights`. Non-finite
        samples stay held and cut off, as for ``z``."""
        states = [fp.held(s) for s in recorder.states(sol.z)]
        attached = []
        if states:
            est = state_estimator(grad)
            attached = [est.attach(fp.cell, s, fp.grad_inputs, fp.spec) for s in states]
        sol.states = [*attached, z]
        sol.state_weights = self.weights()

    def solve_sliced(self, grad: GradientEstimator, fp: ForwardPass) -> tuple[State, Solution]:
        """The sliced solve of ``fp`` (``mode="sliced"``): ``N`` segments with the solver's
        options and ``max_iter // N`` evaluations each; after each segment but the last,
        ``UPG(k, λ)`` of ``grad`` from its detached result is a supervised state and the next
        segment starts from that state's value; the last segment gets ``grad`` itself.
        Returns ``(z, info)`` of the last segment with ``info.states``/``state_weights``."""
        from ..forward import ForwardPass
        from ..solvers import with_options

        est = state_estimator(grad)
        budget = self.segments(int(getattr(fp.solver, "max_iter", 0)))[0]
        segment = with_options(fp.solver, max_iter=budget)
        attached: list[State] = []
        start = fp.z0
        for _ in range(self.states - 1):
            part = ForwardPass(
                fp.f, fp.inputs, start, fp.spec, segment, on_nonfinite=fp.on_nonfinite
            )
            state = part.attach(est.attach, part.solve())
            attached.append(state)
            start = detach(state)
        last = ForwardPass(fp.f, fp.inputs, start, fp.spec, segment, on_nonfinite=fp.on_nonfinite)
        z, sol = grad.equilibrium(last)
        sol.states = [*attached, z]
        sol.state_weights = self.weights()
        return z, sol


class StateRecorder:
    """``g`` that keeps detached copies of its inputs, to return ``N − 1`` states spaced over
    the evaluations the solve actually made (``T``, known only when it stops): the inputs of
    evaluations ``⌊m T / N⌋ + 1``, ``m = 1 … N − 1`` (:meth:`Correction.evaluations` with
    ``T``). It holds at most ``4 N`` states during the solve: past that it keeps every
    second one (evaluations ``1, 1 + s, 1 + 2s, …`` with the stride ``s`` doubling), so a long
    solve gets, for each target, the kept evaluation nearest to it (exact while ``T <= 4 N``).
    A solve with fewer than ``N`` evaluations has fewer distinct iterates than the states asked
    for: :meth:`states` refuses it."""

    def __init__(self, g: Callable[[State], Any], states: int, max_iter: int) -> None:
        self.g = g
        self.n = states
        self.max_iter = max_iter
        self.cap = 4 * states
        self.stride = 1
        self.count = 0
        self.kept: dict[int, State] = {}

    def __call__(self, z: State) -> Any:
        self.count += 1
        if (self.count - 1) % self.stride == 0:
            self.kept[self.count] = _clone(z)
            if len(self.kept) > self.cap:
                self.stride *= 2
                self.kept = {e: v for e, v in self.kept.items() if (e - 1) % self.stride == 0}
        return self.g(z)

    def evaluations(self) -> list[int]:
        """The evaluations whose inputs :meth:`states` returns (after the solve)."""
        t = self.count
        if t < self.n:
            raise CorrectionError(
                f"Correction(states={self.n}) needs {self.n - 1} iterates before the solution, "
                f"but the forward solve evaluated F only {t} time(s) (it stopped early, e.g. "
                f"converged at its first checks): use fewer states, a tighter solver tol, or "
                f"Correction(states=1)"
            )
        kept = sorted(self.kept)
        out = []
        for m in range(1, self.n):
            target = m * t // self.n + 1
            out.append(min(kept, key=lambda e: (abs(e - target), e)))
        return out

    def states(self, solution: State) -> list[State]:
        """The recorded states in trajectory order (inputs of the evaluations of
        :meth:`evaluations`, all actually visited by the solve)."""
        del solution  # kept in the signature: every state is now a visited iterate
        return [self.kept[e] for e in self.evaluations()]


def _clone(z: State) -> State:
    if isinstance(z, Tensor):
        return z.detach().clone()
    return tuple(t.detach().clone() for t in z)


def state_estimator(grad: GradientEstimator) -> GradientEstimator:
    """The phantom gradient of the earlier states: ``grad``'s
    :meth:`~phantomdeq.grad.GradientEstimator.correction_estimator` (for UPG and NPG: ``UPG``
    with ``grad``'s ``k``, ``λ`` and, for ``k="auto"``, ``tol`` and ``k_max``)."""
    est = grad.correction_estimator()
    if est is None:
        raise TypeError(
            "Correction: fixed-point correction gives every earlier state the unrolled phantom "
            "gradient UPG(k, lam) of the DEQ's estimator and needs grad=UPG(...) or NPG(...), "
            f"got {type(grad).__name__}"
        )
    return est


def corrected_loss(
    loss: Callable[[State], Tensor], states: Sequence[State], weights: Sequence[float]
) -> Tensor:
    """``Σ_m w_m loss(s_m)`` over the states and weights of a corrected DEQ's ``info``."""
    if len(states) != len(weights) or not states:
        raise ValueError(
            f"corrected_loss: need as many weights as states (>= 1), got {len(states)} states "
            f"and {len(weights)} weights"
        )
    total = weights[-1] * loss(states[-1])
    for w, s in zip(weights[:-1], states[:-1]):
        total = total + w * loss(s)
    return total
