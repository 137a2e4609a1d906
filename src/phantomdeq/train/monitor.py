"""Live gradient-quality monitor: the gradient being used for training vs the exact gradient.

The paper measures the precision of a phantom gradient by its cosine similarity with the
exact gradient (Sec. 3, "Precision of the Phantom Gradient"; Fig. 1 in the synthetic setting,
Fig. 2 during real training).  :class:`GradientMonitor` makes that measurement on a live
training step: on the current batch, with the current parameters and the *same* forward
solution ``h*`` and dropout mask, it computes

* ``g_used``  -- the gradient of the loss produced by the model's own estimator
  (UPG eq. 17, NPG eq. 18, IFT eq. 4 with the training backward solver, ...), and
* ``g_exact`` -- the implicit-function-theorem gradient of eq. (4),
  ``dL/dθ = (∂L/∂h*) (I - ∂F/∂h*)^{-1} ∂F/∂θ``, obtained with a tightly converged backward
  solve (``IFT(solver=Broyden(max_iter=60, tol=1e-6))`` by default),

and returns their cosine similarity and norm ratio ``||g_used|| / ||g_exact||``.

``compare`` adds further estimators measured on the same ``h*`` and batch without being used for
training -- e.g. UPG and NPG ``A_{5,0.5}`` along an IFT-trained run, the paper's Fig. 2 -- each
reported as ``cosine_<label>`` / ``norm_ratio_<label>``.

By default both gradients are taken with respect to the parameters ``θ`` of the equilibrium
cell ``F`` only (``params="cell"``), which is the quantity the paper's cosine is about; the
stem (input injection) and head gradients are identical up to the estimator's effect on
``h`` and would inflate the similarity.  ``params="all"`` uses every trainable parameter.

Side effects are undone: ``.grad`` fields are not touched (``torch.autograd.grad`` is used),
module buffers (BatchNorm running statistics) are restored, the global torch RNG (CPU and
CUDA) and the optional dropout ``generator`` are put back to their states on entry, and the
model's estimator, solver and train/eval mode are restored -- so enabling the monitor does not
change the training trajectory (nor resume determinism).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from phantomdeq.diagnostics import cosine_similarity
from phantomdeq.solvers.base import InverseSolver

__all__ = ["GradientMonitor", "cosine_and_ratio", "find_deq", "monitor_record"]

MONITOR_PARAMS = ("cell", "all")


def find_deq(model: nn.Module) -> Any:
    """The first :class:`phantomdeq.DEQ` inside ``model`` (``model`` itself if it is one)."""
    from phantomdeq.deq import DEQ

    for m in model.modules():
        if isinstance(m, DEQ):
            return m
    raise ValueError(
        f"GradientMonitor: model {type(model).__name__} contains no phantomdeq.DEQ module"
    )


def cosine_and_ratio(a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[float, float, float, float]:
    """``(cos(a, b), ||a|| / ||b||, ||a||, ||b||)`` of two lists of tensors, flattened and
    concatenated, in float64."""
    if len(a) != len(b):
        raise ValueError(f"cosine_and_ratio: got {len(a)} and {len(b)} tensors")
    va, vb = (
        torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for t in x])
        for x in (a, b)
    )
    norm_a, norm_b = float(va.norm()), float(vb.norm())
    cos = cosine_similarity(va, vb) if norm_a * norm_b > 0 else float("nan")
    ratio = norm_a / norm_b if norm_b > 0 else float("nan")
    return cos, ratio, norm_a, norm_b


class _ReplaySolver:
    """Runs the wrapped solver on the first pass and returns the recorded solutions, in call
    order, on the next passes -- so both gradients are taken at the bit-identical ``h*``."""

    def __init__(self, solver: Any, *, with_inverse: bool = False) -> None:
        self.solver = solver
        self.recorded: list[Any] = []
        self.replaying = False
        self.position = 0
        # record Broyden's inverse estimate too (a compared estimator such as SHINE reuses it)
        self.with_inverse = with_inverse

    def __call__(self, g: Callable[..., Any], z0: Any) -> Any:
        if not self.replaying:
            sol = self.solver.solve_with_inverse(g, z0) if self.with_inverse else self.solver(g, z0)
            self.recorded.append(sol)
            return sol
        if self.position >= len(self.recorded):
            raise RuntimeError(
                "GradientMonitor: the loss closure called the DEQ more often on the second pass "
                "than on the first; it must be deterministic"
            )
        sol = self.recorded[self.position]
        self.position += 1
        return sol

    def replay(self) -> None:
        self.replaying = True
        self.position = 0


class _ReplayInverseSolver(_ReplaySolver):
    """:class:`_ReplaySolver` of a solver that also returns its inverse estimate (the forward
    Broyden of ``grad=SHINE()``): the recorded solutions keep it."""

    def solve_with_inverse(self, g: Callable[..., Any], z0: Any) -> Any:
        if not self.replaying:
            sol = self.solver.solve_with_inverse(g, z0)
            self.recorded.append(sol)
            return sol
        return self(g, z0)


def _replay_solver(solver: Any, needs_inverse: list[str]) -> _ReplaySolver:
    """The replaying wrapper of the DEQ's forward ``solver``; ``needs_inverse`` names the
    estimators that reuse its inverse estimate (then the first pass records it)."""
    if isinstance(solver, InverseSolver):
        return _ReplayInverseSolver(solver, with_inverse=bool(needs_inverse))
    if needs_inverse:
        raise ValueError(
            f"GradientMonitor: {', '.join(needs_inverse)} reuse(s) the forward solve's "
            f"inverse-Jacobian estimate and need(s) the DEQ's solver to be Broyden(...) (a solver "
            f"with solve_with_inverse), got {solver!r}"
        )
    return _ReplaySolver(solver)


class _Restore:
    """Snapshot of the state a gradient pass may change (RNGs, generator, buffers)."""

    def __init__(self, model: nn.Module, generator: torch.Generator | None) -> None:
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.generator = generator
        self.gen_state = generator.get_state() if generator is not None else None
        self.buffers = [(b, b.detach().clone()) for b in _buffers(model)]

    def __call__(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if self.generator is not None and self.gen_state is not None:
            self.generator.set_state(self.gen_state)
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)


def _buffers(model: nn.Module) -> Iterator[Tensor]:
    seen: set[int] = set()
    for buf in model.buffers():
        if id(buf) not in seen:
            seen.add(id(buf))
            yield buf


class GradientMonitor:
    """Cosine similarity and norm ratio of the training gradient against the exact one.

    Args:
        exact: the reference estimator; default ``IFT(solver=Broyden(max_iter=60, tol=1e-6))``
            (eq. 4 with a tight backward solve).  Its backward-solve statistics are reported.
        params: ``"cell"`` (default: the parameters ``θ`` of the equilibrium cell ``F``) or
            ``"all"`` (every trainable parameter of the model).

    Use :meth:`measure` with any loss closure, or :meth:`measure_classifier` for an MDEQ-style
    classifier called as ``model(x, mode="deq", generator=...)``.
    """

    def __init__(
        self,
        exact: Any = None,
        *,
        params: Literal["cell", "all"] = "cell",
        compare: Mapping[str, Any] | None = None,
    ) -> None:
        from phantomdeq.grad.base import GradientEstimator

        if exact is None:
            from phantomdeq.grad import IFT
            from phantomdeq.solvers import Broyden

            exact = IFT(solver=Broyden(max_iter=60, tol=1e-6))
        if not isinstance(exact, GradientEstimator):
            raise TypeError(
                f"GradientMonitor: exact must be a phantomdeq.grad estimator (usually IFT), got {exact!r}"
            )
        if exact.tracks_forward:
            raise ValueError(
                "GradientMonitor: exact=BPTT() is not supported; use IFT(solver=tight solver)"
            )
        if params not in MONITOR_PARAMS:
            raise ValueError(
                f"GradientMonitor: params must be one of {MONITOR_PARAMS}, got {params!r}"
            )
        compare = dict(compare or {})
        for label, est in compare.items():
            if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9_.]+", label):
                raise ValueError(
                    f"GradientMonitor: compare labels must be non-empty strings of letters, "
                    f"digits, '_' and '.', got {label!r}"
                )
            if not isinstance(est, GradientEstimator):
                raise TypeError(
                    f"GradientMonitor: compare[{label!r}] must be a phantomdeq.grad estimator, "
                    f"got {est!r}"
                )
            if est.tracks_forward:
                raise ValueError(
                    f"GradientMonitor: compare[{label!r}] = BPTT() is not supported (it needs the "
                    f"forward iterations recorded)"
                )
        self.exact = exact
        self.params = params
        self.compare = compare
        self.last_compared: dict[str, list[Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"GradientMonitor(exact={self.exact!r}, params={self.params!r}, "
            f"compare={self.compare!r})"
        )

    def parameters_of(self, model: nn.Module, deq: Any = None) -> list[nn.Parameter]:
        """The parameters the gradients are compared on (see ``params``)."""
        if self.params == "cell":
            deq = find_deq(model) if deq is None else deq
            source = deq.f.parameters()
        else:
            source = model.parameters()
        out, seen = [], set()
        for p in source:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        if not out:
            raise ValueError(f"GradientMonitor: no trainable parameters for params={self.params!r}")
        return out

    def gradients(
        self,
        model: nn.Module,
        loss_closure: Callable[[], Tensor],
        *,
        generator: torch.Generator | None = None,
        deq: Any = None,
    ) -> tuple[list[Tensor], list[Tensor], dict[str, float]]:
        """``(g_used, g_exact, extra)``: both gradient lists (aligned with
        :meth:`parameters_of`) and the loss / exact backward-solve statistics. The gradients of
        the ``compare`` estimators are left in :attr:`last_compared` (label -> list).

        ``loss_closure()`` must run the model forward in train mode on the batch (drawing its
        dropout masks from ``generator`` if given) and return the scalar loss.  It is called
        twice; the forward solve is run once and replayed, and the RNGs, ``generator`` and
        buffers are reset before the second call and restored at the end.
        """
        deq = find_deq(model) if deq is None else deq
        params = self.parameters_of(model, deq)
        was_training = model.training
        restore = _Restore(model, generator)
        # BPTT records the forward iterations itself: recompute (deterministically) instead.
        needs_inverse = [
            f"compare[{label!r}]={type(est).__name__}()"
            for label, est in self.compare.items()
            if est.needs_forward_inverse
        ]
        if self.exact.needs_forward_inverse:
            needs_inverse.append(f"exact={type(self.exact).__name__}()")
        replay = None if deq.grad.tracks_forward else _replay_solver(deq.solver, needs_inverse)
        first = contextlib.nullcontext() if replay is None else deq.using(solver=replay)
        extra: dict[str, float] = {}
        try:
            model.train()
            with torch.enable_grad():
                with first:
                    loss = loss_closure()
                    g_used = _grad(loss, params)
                    extra["loss"] = float(loss.detach())
                    del loss
                self.last_compared = {}
                for label, est in self.compare.items():
                    restore()
                    if replay is not None:
                        replay.replay()
                    ctx = (
                        deq.using(grad=est)
                        if replay is None
                        else deq.using(solver=replay, grad=est)
                    )
                    with ctx:
                        loss = loss_closure()
                        self.last_compared[label] = _grad(loss, params)
                        del loss
                restore()
                if replay is not None:
                    replay.replay()
                if hasattr(self.exact, "last_backward"):
                    self.exact.last_backward = None
                second = (
                    deq.using(grad=self.exact)
                    if replay is None
                    else deq.using(solver=replay, grad=self.exact)
                )
                with second:
                    loss = loss_closure()
                    g_exact = _grad(loss, params)
                    del loss
            last = getattr(self.exact, "last_backward", None)
            if last is not None:
                extra["exact_bwd_residual"] = float(last.residual.float().max())
                extra["exact_bwd_niter"] = float(last.niter)
        finally:
            restore()
            model.train(was_training)
        return g_used, g_exact, extra

    def measure(
        self,
        model: nn.Module,
        loss_closure: Callable[[], Tensor],
        *,
        generator: torch.Generator | None = None,
        deq: Any = None,
    ) -> dict[str, float]:
        """Compare the model's gradient with the exact one on one batch.

        Returns ``cosine`` (cos ∠(g_used, g_exact)), ``norm_ratio`` (||g_used|| / ||g_exact||),
        ``used_norm``, ``exact_norm``, ``loss``, ``time_s`` (wall time of the whole
        measurement), ``cosine_<label>`` and ``norm_ratio_<label>`` for each ``compare``
        estimator and, for an IFT reference, ``exact_bwd_residual`` (batch-max residual of
        the backward solve, in its stop mode) and ``exact_bwd_niter``.
        """
        t0 = time.perf_counter()
        g_used, g_exact, extra = self.gradients(model, loss_closure, generator=generator, deq=deq)
        cos, ratio, n_used, n_exact = cosine_and_ratio(g_used, g_exact)
        compared: dict[str, float] = {}
        for label, g in self.last_compared.items():
            c, r, _, _ = cosine_and_ratio(g, g_exact)
            compared[f"cosine_{label}"] = c
            compared[f"norm_ratio_{label}"] = r
        device = g_used[0].device if g_used else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {
            "cosine": cos,
            "norm_ratio": ratio,
            "used_norm": n_used,
            "exact_norm": n_exact,
            **compared,
            **extra,
            "time_s": time.perf_counter() - t0,
        }

    def measure_classifier(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        generator: torch.Generator | None = None,
        label_smoothing: float = 0.0,
    ) -> dict[str, float]:
        """:meth:`measure` with the cross-entropy loss of ``model(x, mode="deq",
        generator=generator).logits`` (an MDEQ classifier)."""
        import torch.nn.functional as F

        def closure() -> Tensor:
            out = model(x, mode="deq", generator=generator)
            return F.cross_entropy(out.logits, y, label_smoothing=label_smoothing)

        return self.measure(model, closure, generator=generator)


def monitor_record(
    monitor: GradientMonitor,
    model: nn.Module,
    loss_closure: Callable[[], Tensor],
    generator: torch.Generator | None,
) -> dict[str, float]:
    """:meth:`GradientMonitor.measure` of ``loss_closure`` (a training step's loss: the task's
    loss of the model's prediction on the step's batch) as the ``monitor_*`` fields of the
    step's ``metrics.jsonl`` record (``monitor_cos``, ``monitor_norm_ratio``,
    ``monitor_time_s``, ``monitor_exact_residual``, ``monitor_cos_<label>``,
    ``monitor_norm_ratio_<label>``). A failed exact solve gives NaN fields, never raises."""
    from phantomdeq.errors import DEQError

    t0 = time.perf_counter()
    try:
        res = monitor.measure(model, loss_closure, generator=generator)
    except DEQError:
        return {
            "monitor_cos": math.nan,
            "monitor_norm_ratio": math.nan,
            "monitor_time_s": time.perf_counter() - t0,
        }
    out = {
        "monitor_cos": res["cosine"],
        "monitor_norm_ratio": res["norm_ratio"],
        "monitor_time_s": res["time_s"],
    }
    if "exact_bwd_residual" in res:
        out["monitor_exact_residual"] = res["exact_bwd_residual"]
    for key, value in res.items():  # the train.monitor_compare estimators
        if key.startswith("cosine_"):
            out["monitor_cos_" + key[len("cosine_") :]] = value
        elif key.startswith("norm_ratio_"):
            out["monitor_norm_ratio_" + key[len("norm_ratio_") :]] = value
    return out


def _grad(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    if not loss.requires_grad:
        raise RuntimeError(
            "GradientMonitor: the loss does not require grad; the closure must run the model in "
            "train mode with gradients enabled"
        )
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
