"""Unrolled phantom gradient (UPG, paper eq. 17) and the one-step gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._state import State, StateSpec, as_tuple, detach, like
from ..solvers.base import Solution
from .adaptive import AUTO, all_below, check_k_auto, refuse_when_compiling, row_norms
from .base import Cell, GradientEstimator, VJPAt, check_lam
from .second_order import tensors_requiring_grad


def _damped_step(f: Cell, spec: StateSpec, lam: float, h: State, *inputs: Any) -> State:
    fh = spec.check(f(h, *inputs))
    if lam == 1.0:
        return like(spec, list(fh))
    return like(spec, [lam * a + (1.0 - lam) * b for a, b in zip(fh, as_tuple(h))])


class UPG(GradientEstimator):
    """Unrolled phantom gradient ``A^unr_{k,λ}`` (paper eq. 17).

    From the detached forward solution ``h_0 = h*``, unroll ``k`` damped steps
    ``h_{t+1} = λ F(h_t) + (1 − λ) h_t`` (eq. 13) with autograd and return ``h_k``; back-propagating
    through them yields exactly eq. (17) with the Jacobians taken along that trajectory.
    Memory O(k). With ``checkpoint=True`` each step is recomputed in the backward pass, so only
    the k step inputs are stored (O(1) activations per step).

    Adaptive k (``k="auto"``, with ``tol`` and ``k_max``). The truncation error of eq. (17)
    is the tail of the series ``Σ_i (Bᵀ)^i g`` of the incoming gradient ``g``, ``B = λ ∂F/∂h +
    (1 − λ) I``, so the number of steps is decided in the backward pass, on that series, by
    the same rule as :class:`NPG`'s: the forward pass evaluates one tracked damped step
    ``y = Φ(h_0)`` from ``h_0 = h*``; the backward pass forms ``(Bᵀ)^i g`` by vector-Jacobian
    products on ``y``'s graph (``B`` at ``h*``) until the first ``i >= 1`` whose norm is below
    ``tol`` times the norm of the partial sum, for every sample, or ``k_max`` terms, and takes
    ``k = i + 1`` steps (the number of terms, as ``NPG(k="auto")`` would); it then recomputes
    the ``k`` damped steps of ``UPG(k)`` from the same ``h_0`` and back-propagates ``g``
    through them, so the gradient it returns for a given ``g`` is exactly (bit for bit, same
    products on the same graphs) ``UPG(k)``'s. ``k`` is stored in :attr:`last_k` (set by the
    backward pass: read it after ``backward()``). The forward *value* is ``Φ(h_0)``, the value
    of ``UPG(k=1)``: ``UPG(k)``'s output ``h_k`` differs from it by the forward solve's residual
    carried ``k − 1`` more steps (nothing at an exact fixed point; under
    :class:`~phantomdeq.grad.Correction`, whose earlier states are not fixed points, each state
    gets one damped step as its value and the adaptive gradient). Because the decision no
    longer reads the forward differences, a tightly converged forward solve does not force
    ``k_max``. Cost: one evaluation of ``F`` in the forward pass; in the backward pass ``k − 1``
    products for the decision, ``k`` recomputed steps and their backward. Memory: the graph
    of one step between the passes, then the ``k`` steps' activations during the backward (O(1)
    per step with ``checkpoint=True``); never ``k_max``. Gradients go to the DEQ inputs and
    to every leaf ``f``'s graph reaches (parameters of a module or of a closure); a tensor
    reached both directly and through an input is refused. Under ``create_graph=True`` the
    recomputed steps are differentiated with ``create_graph``: the double backward of
    ``UPG(k)`` (the choice of ``k`` itself is not differentiated). One host read per product
    (eager mode only: refused under ``torch.compile``; ``DEQ(cuda_graph=True)`` captures only
    the solve, so it works there).
    """

    name = "upg"

    def __init__(
        self,
        *,
        k: int | str = 5,
        lam: float = 0.5,
        checkpoint: bool = False,
        tol: float | None = None,
        k_max: int | None = None,
    ) -> None:
        fixed, self.tol, self.k_max = check_k_auto(k, tol, k_max, "UPG")
        self.k: int | str = AUTO if fixed is None else fixed
        self.lam = check_lam(lam, "UPG")
        if not isinstance(checkpoint, bool):
            raise ValueError(f"UPG: checkpoint must be True or False, got {checkpoint!r}")
        self.checkpoint = checkpoint
        #: the number of steps of the last :meth:`attach` (= ``k`` unless ``k="auto"``)
        self.last_k: int | None = fixed

    @property
    def adaptive(self) -> bool:
        """True for ``k="auto"``."""
        return self.k == AUTO

    def _options(self) -> dict[str, object]:
        opts: dict[str, object] = {"k": self.k, "lam": self.lam, "checkpoint": self.checkpoint}
        if self.adaptive:
            opts.update(tol=self.tol, k_max=self.k_max)
        return opts

    def correction_estimator(self) -> UPG:
        """A UPG with this one's ``k`` and ``λ`` (and, for ``k="auto"``, ``tol`` and
        ``k_max``)."""
        if self.adaptive:
            return UPG(k="auto", lam=self.lam, tol=self.tol, k_max=self.k_max)
        return UPG(k=self.k, lam=self.lam)

    def _step(self, f: Cell, spec: StateSpec, h: State, inputs: Sequence[Any]) -> State:
        if self.checkpoint:
            return checkpoint(_damped_step, f, spec, self.lam, h, *inputs, use_reentrant=False)  # type: ignore[no-any-return]
        return _damped_step(f, spec, self.lam, h, *inputs)

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        h = detach(z_star)
        if not isinstance(self.k, int):
            return self._attach_auto(f, h, inputs, spec)
        with torch.enable_grad():
            for _ in range(self.k):
                h = self._step(f, spec, h, inputs)
        return h

    def _attach_auto(self, f: Cell, h: State, inputs: Sequence[Any], spec: StateSpec) -> State:
        refuse_when_compiling("UPG")
        z_req = tuple(t.detach().requires_grad_() for t in as_tuple(h))
        with torch.enable_grad():
            ys = as_tuple(_damped_step(f, spec, self.lam, like(spec, list(z_req)), *inputs))
        extras = _dependencies(ys, inputs, z_req)
        node = _AutoNode(self, f, h, inputs, VJPAt(ys, z_req, spec), extras)
        out = _AutoUnroll.apply(node, len(ys), *ys, *extras)
        return like(spec, list(out))


class _AutoUnroll(torch.autograd.Function):
    """``UPG(k="auto")``'s node. Forward: identity on ``y = Φ(h_0)`` (one tracked damped step
    from the detached ``h_0``). Backward, for the incoming gradient ``g``: the series terms
    ``(Bᵀ)^i g`` by vector-Jacobian products on the graph of ``y`` (``B = ∂Φ/∂h`` at ``h_0``)
    until the first ``i >= 1`` with ``‖(Bᵀ)^i g‖ < tol · ‖Σ_{i'<=i} (Bᵀ)^{i'} g‖`` for every
    sample (or ``k_max`` terms) give ``k = i + 1``; then the ``k`` damped steps of ``UPG(k)`` are
    recomputed from ``h_0`` and ``g`` is back-propagated through them to the Function's extra
    inputs (the leaves and inputs ``f`` depends on). Inputs: ``(node, n_ys, *ys, *extras)``."""

    @staticmethod
    def forward(ctx: Any, node: _AutoNode, n_ys: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.node = node
        ctx.n_ys = n_ys
        return tuple(y.detach().clone() for y in tensors[:n_ys])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        node: _AutoNode = ctx.node
        create_graph = torch.is_grad_enabled()
        spec = node.vjp.spec
        g_parts = tuple(
            torch.zeros_like(y) if gr is None else gr for gr, y in zip(grads, node.vjp.ys)
        )
        k = node.choose_k(spec.flatten(like(spec, [gr.detach() for gr in g_parts])))
        node.owner.last_k = k
        with torch.enable_grad():
            h = node.h0
            for _ in range(k):
                h = node.owner._step(node.f, spec, h, node.inputs)
            out = as_tuple(h)
            live = [i for i, o in enumerate(out) if o.requires_grad]
            extras = node.extras
            got: tuple[Tensor | None, ...]
            if live and extras:
                got = torch.autograd.grad(
                    [out[i] for i in live],
                    extras,
                    [g_parts[i] for i in live],
                    allow_unused=True,
                    create_graph=create_graph,
                )
            else:
                got = (None,) * len(extras)
        return (None, None, *([None] * ctx.n_ys), *got)


class _AutoNode:
    """What :class:`_AutoUnroll`'s backward needs: the estimator, the cell, the start ``h_0``,
    the inputs, the products on ``y = Φ(h_0)`` and the extra inputs."""

    def __init__(
        self,
        owner: UPG,
        f: Cell,
        h0: State,
        inputs: Sequence[Any],
        vjp: VJPAt,
        extras: list[Tensor],
    ) -> None:
        self.owner = owner
        self.f = f
        self.h0 = h0
        self.inputs = inputs
        self.vjp = vjp
        self.extras = extras

    def choose_k(self, g: Tensor) -> int:
        """The number of unroll steps: the number of series terms ``(Bᵀ)^i g`` up to the first
        one below ``tol`` times the partial sum (every sample), at most ``k_max``."""
        tol, k_max = self.owner.tol, self.owner.k_max
        if tol is None or k_max is None:  # set together with k="auto"
            raise RuntimeError("UPG: k='auto' without tol/k_max")
        w = g
        acc = g.clone()
        terms = 1
        with torch.no_grad():
            while terms < k_max:
                with torch.enable_grad():
                    w = self.vjp(w)  # w <- Bᵀ w (Φ's product: the damping is in Φ)
                acc += w
                terms += 1
                if all_below(row_norms(w), row_norms(acc), tol, zero_stops=True):
                    break
        return terms


def _dependencies(
    ys: Sequence[Tensor], inputs: Sequence[Any], z_req: Sequence[Tensor]
) -> list[Tensor]:
    """The tensors ``y = Φ(h_0)`` depends on, other than ``h_0``: the inputs requiring grad
    (kept as they are: their own history continues the backward) and the leaves requiring
    grad reached from ``y`` without passing through those inputs (``f``'s parameters, whether
    ``f`` is a module or a closure). Refuses (``RuntimeError``) a leaf that is reached both
    ways, whose gradient would be counted twice."""
    xs: list[Tensor] = []
    tensors_requiring_grad(tuple(inputs), xs)
    stops = {id(x.grad_fn) for x in xs if x.grad_fn is not None}
    skip = {id(t) for t in (*xs, *z_req)}

    def leaves(roots: list[Any], stop: set[int]) -> list[Tensor]:
        stack = [r for r in roots if r is not None]
        seen: set[int] = set()
        keep: list[Any] = []  # hold the nodes so that their ids stay unique during the walk
        found: list[Tensor] = []
        while stack:
            fn = stack.pop()
            if id(fn) in seen or id(fn) in stop:
                continue
            seen.add(id(fn))
            keep.append(fn)
            variable = getattr(fn, "variable", None)
            if isinstance(variable, Tensor):  # AccumulateGrad
                if id(variable) not in skip:
                    found.append(variable)
                continue
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
        return found

    own = leaves([y.grad_fn for y in ys], stops)
    upstream = {id(t) for t in leaves([x.grad_fn for x in xs], set())}
    twice = [t for t in own if id(t) in upstream]
    if twice:
        raise RuntimeError(
            "UPG(k='auto'): f depends on a tensor requiring grad both directly and through a "
            f"DEQ input (shape {tuple(twice[0].shape)}); the adaptive backward would count its "
            "gradient twice. Pass it only as an input, or use a fixed k"
        )
    return [*xs, *own]


class OneStep(GradientEstimator):
    """One-step (Jacobian-free) gradient: output ``F(h*)`` with ``h*`` detached, i.e. ``A = ∂F/∂θ``.
    Equal to ``UPG(k=1, lam=1)``."""

    name = "onestep"

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        with torch.enable_grad():
            return like(spec, list(spec.check(f(detach(z_star), *inputs))))
