"""The gradient-estimator interface and the shared custom autograd Function used by IFT and NPG.

Second order. The Function's backward runs in two modes. Without grad mode (a plain
``backward()`` / ``autograd.grad`` call) it maps the incoming gradient ``g`` to ``v = rule(g)``
with detached vector-Jacobian products; autograd then continues through the tracked
``y = F(h*)`` to θ and the inputs. Under ``create_graph=True`` (grad mode on in the backward)
the rule's :meth:`BackwardRule.create_graph_backward` runs instead: explicit formulas (NPG)
redo the same products with ``create_graph`` so that the result is differentiable w.r.t. θ, the
inputs and ``g`` (``h*`` held fixed); IFT differentiates the implicit map itself (see
:mod:`phantomdeq.grad.implicit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._state import State, StateSpec, as_tuple, like
from ..solvers.base import InverseSolver, Solution, Solver

if TYPE_CHECKING:
    from ..forward import ForwardPass

Cell = Callable[..., Any]


def check_lam(lam: object, owner: str) -> float:
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam):
        raise ValueError(f"{owner}: lam must be a number in (0, 1], got {lam!r}")
    if not 0.0 < float(lam) <= 1.0:
        raise ValueError(f"{owner}: lam must be in (0, 1], got {lam!r}")
    return float(lam)


def check_k(k: object, owner: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{owner}: k must be an integer >= 1, got {k!r}")
    return k


def check_estimator(value: object, *, owner: str) -> GradientEstimator:
    """``value`` if it is a :class:`GradientEstimator`; ``TypeError`` naming ``owner`` otherwise."""
    if not isinstance(value, GradientEstimator):
        raise TypeError(
            f"{owner}: grad must be a phantomdeq.grad estimator (IFT, UPG, NPG, OneStep, BPTT), "
            f"got {type(value).__name__} {value!r}"
        )
    return value


class GradientEstimator:
    """How the DEQ output gets its gradient, and what the estimator needs from the forward solve.

    A :class:`~phantomdeq.DEQ` asks its estimator three things. At construction (and in
    ``DEQ.using``), :meth:`check_solver` for each forward solver the estimator will run with
    and, with ``cuda_graph=True``, :meth:`check_graphed`: each refuses what the estimator cannot
    work with. In a forward pass that attaches a gradient, :meth:`equilibrium` receives the
    pass (:class:`~phantomdeq.forward.ForwardPass`), runs the solve it needs and returns the
    state carrying its gradient with the forward :class:`~phantomdeq.Solution`. The default
    runs the solver without a graph and calls :meth:`attach`; an estimator with another need
    (a recorded solve, the solver's inverse estimate) overrides these methods in its own module.

    :meth:`attach` receives ``f``, the detached forward solution ``z_star``, the extra inputs
    and (keyword ``info``) the forward :class:`~phantomdeq.Solution`, and returns a state whose
    autograd graph carries the estimator's gradient to ``f``'s parameters and to the inputs.
    """

    name = "estimator"
    #: True when the estimator back-propagates through the forward solve itself (BPTT): it
    #: records the solve in :meth:`equilibrium`, and no fixed-point correction records it.
    tracks_forward = False
    #: True when the estimator needs the forward solve's inverse-Jacobian estimate
    #: (``info.inverse``; SHINE, ``IFT(init="shine")``): the default :meth:`check_solver`,
    #: :meth:`check_graphed` and :meth:`equilibrium` then require a solver with
    #: ``solve_with_inverse`` (Broyden) and call that.
    needs_forward_inverse = False

    def check_solver(self, solver: Solver, name: str) -> None:
        """Refuse (``TypeError`` naming the DEQ and ``name``, e.g. ``"eval_solver"``) a forward
        solver this estimator cannot attach its gradient after."""
        if self.needs_forward_inverse and not isinstance(solver, InverseSolver):
            raise TypeError(
                f"DEQ: grad={type(self).__name__}() reuses the forward solve's "
                f"inverse-Jacobian estimate and needs {name}=Broyden(...) (a solver "
                f"with a solve_with_inverse(g, z0) method), got {solver!r}"
            )

    def check_graphed(self) -> None:
        """Refuse (``ValueError``) a forward solve replayed from a CUDA graph
        (``DEQ(cuda_graph=True)``), which returns the solution and its statistics only."""
        if self.needs_forward_inverse:
            raise ValueError(
                f"DEQ: cuda_graph=True replays the forward solve from a CUDA graph, which "
                f"does not return Broyden's inverse estimate that grad="
                f"{type(self).__name__}() needs; use cuda_graph=False"
            )

    def equilibrium(self, fp: ForwardPass) -> tuple[State, Solution]:
        """Solve the forward pass ``fp`` and attach this estimator's gradient: ``(z, info)``."""
        if self.needs_forward_inverse:  # Broyden keeps its inverse estimate
            solver = fp.solver
            if not isinstance(solver, InverseSolver):  # replaced after construction
                raise TypeError(
                    f"DEQ: grad={type(self).__name__}() needs a solver with "
                    f"solve_with_inverse(g, z0) (Broyden), got {type(solver).__name__}"
                )
            sol = fp.solve(solver.solve_with_inverse)
        else:
            sol = fp.solve()
        return fp.attach(self.attach, sol), sol

    def correction_estimator(self) -> GradientEstimator | None:
        """The estimator of the earlier states under fixed-point correction
        (:class:`~phantomdeq.grad.Correction`), None when this one supports no correction."""
        return None

    def attach(
        self,
        f: Cell,
        z_star: State,
        inputs: Sequence[Any],
        spec: StateSpec,
        *,
        info: Solution | None = None,
    ) -> State:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict[str, object]:
        return {}


def flat_cat(spec: StateSpec, parts: Sequence[Tensor]) -> Tensor:
    """Differentiable ``(B, D)`` concatenation of state parts (``spec.flatten`` copies into a
    buffer; this one keeps the autograd graph of every part)."""
    if not spec.is_tuple:
        return parts[0].reshape(spec.batch, -1)
    return torch.cat([p.reshape(spec.batch, -1) for p in parts], dim=1)


def contiguous_parts(spec: StateSpec, flat: Tensor) -> tuple[Tensor, ...]:
    """The state parts of a flat ``(B, D)`` tensor as contiguous tensors. For a tuple state the
    views of ``flat`` are strided (each part is a slice of every row); handed to autograd as
    cotangents they would be copied by every backward kernel that needs contiguous memory
    (each convolution's backward, at every vector-Jacobian product), so they are copied once
    here. Free for a single tensor."""
    return tuple(p.contiguous() for p in as_tuple(spec.unflatten(flat)))


class VJPAt:
    """Vector-Jacobian products of ``f`` at ``z*`` on the retained graph of ``y = f(z*)``
    (the backward rules' ``vjp``; also :func:`~phantomdeq.diagnostics.spectral_radius`).

    ``create_graph=False`` (first order): the products are detached. ``create_graph=True``:
    they are differentiable w.r.t. ``w``, θ and the inputs (``z*`` is a detached leaf, i.e.
    held fixed).
    """

    def __init__(
        self,
        ys: tuple[Tensor, ...],
        z_req: tuple[Tensor, ...],
        spec: StateSpec,
        *,
        create_graph: bool = False,
    ) -> None:
        self.ys = ys
        self.z_req = z_req
        self.spec = spec
        self.create_graph = create_graph

    def differentiable(self) -> VJPAt:
        """The same products with ``create_graph=True``."""
        return VJPAt(self.ys, self.z_req, self.spec, create_graph=True)

    def __call__(self, w: Tensor) -> Tensor:
        ws = contiguous_parts(self.spec, w)
        grads = torch.autograd.grad(
            self.ys,
            self.z_req,
            ws,
            retain_graph=True,
            allow_unused=True,
            create_graph=self.create_graph,
        )
        parts = [torch.zeros_like(z) if gr is None else gr for gr, z in zip(grads, self.z_req)]
        if self.create_graph:
            return flat_cat(self.spec, parts)
        return self.spec.flatten(like(self.spec, parts)).detach()


class BackwardRule:
    """Maps the incoming gradient ``g`` (flat, (B, D)) at the DEQ output to the vector ``v`` that
    is then back-propagated through one tracked evaluation ``y = f(z*)``.

    ``vjp(w)`` returns ``wᵀ ∂f/∂z`` at ``z*`` (flat), reusing the graph of ``y``.
    """

    #: True when :meth:`create_graph_backward` returns gradients for θ and the inputs itself
    #: (the Function then receives them as extra inputs, see :func:`attach_rule`).
    needs_point = False

    def __call__(self, g: Tensor, vjp: Callable[[Tensor], Tensor]) -> Tensor:
        raise NotImplementedError

    def create_graph_backward(
        self, node: NodeState, grads: tuple[Tensor, ...]
    ) -> tuple[Tensor | None, ...]:
        """Backward under ``create_graph=True``; returns one gradient per Function input after
        the first three (``ys`` then the extras). Default: the explicit formula ``v = rule(g)``
        built from differentiable products, with ``h*`` held fixed (``z*`` is a detached leaf
        of ``y``'s graph), returned for ``ys`` so that autograd continues through ``y``."""
        vjp = node.vjp
        v = self(flat_cat(vjp.spec, grads), vjp.differentiable())
        parts = as_tuple(vjp.spec.unflatten(v))
        return (*parts, *([None] * node.n_extra))


class NodeState:
    """What the backward of :class:`_ImplicitBackward` needs, kept on its ``ctx``: the rule, the
    products at ``z*`` and the rule's point (what :meth:`BackwardRule.create_graph_backward`
    reads)."""

    def __init__(
        self,
        rule: BackwardRule,
        vjp: VJPAt,
        point: Any,
        n_extra: int,
    ) -> None:
        self.rule = rule
        self.vjp = vjp
        self.point = point  # rule-specific (IFT: the re-evaluation point), None otherwise
        self.n_extra = n_extra


class _ImplicitBackward(torch.autograd.Function):
    """Identity in the forward pass on ``y = f(z*)``; in the backward pass, replaces the incoming
    gradient ``g`` by ``rule(g)`` before autograd continues through ``y`` to ``θ`` and inputs.

    Inputs: ``(node, n_ys, *ys, *extras)``; ``extras`` are the tensors a rule with
    ``needs_point`` differentiates w.r.t. directly under ``create_graph`` (IFT: the parameters of
    ``f`` and the inputs that require grad). In first-order mode they receive no gradient.
    """

    @staticmethod
    def forward(ctx: Any, node: NodeState, n_ys: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.node = node
        return tuple(y.detach().clone() for y in tensors[:n_ys])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        node: NodeState = ctx.node
        if torch.is_grad_enabled():  # create_graph=True
            return (None, None, *node.rule.create_graph_backward(node, grads))
        vjp = node.vjp
        spec = vjp.spec
        g = spec.flatten(like(spec, list(grads))).detach()
        with torch.enable_grad():
            v = node.rule(g, vjp)
        parts = contiguous_parts(spec, v)
        return (None, None, *parts, *([None] * node.n_extra))


@torch.compiler.disable
def attach_rule(
    rule: BackwardRule,
    f: Cell,
    z_star: State,
    inputs: Sequence[Any],
    spec: StateSpec,
    *,
    point_factory: Callable[[VJPAt], tuple[Any, Sequence[Tensor]]] | None = None,
) -> State:
    """Output ``y = f(z*)`` (tracked to θ and inputs) whose incoming gradient is mapped by ``rule``.

    ``point_factory(vjp) -> (point, extras)`` (rules with ``needs_point``) supplies the
    rule-specific state for the ``create_graph`` backward and the extra Function inputs.

    Never traced by ``torch.compile``: the rule calls ``vjp`` repeatedly (IFT's backward solve,
    NPG's Neumann terms), and under compilation ``y = f(z*)`` would become one AOTAutograd node
    whose compiled backward computes the gradient of *every* input of the graph -- the weights
    of ``f`` too -- at each of those products, where eager autograd computes the state's alone
    (``torch.autograd.grad(y, z*)`` prunes the weight gradients). Run eagerly, each product
    costs what it costs without compilation; the one evaluation of ``f`` here is a small part
    of a step.
    """
    z_req = tuple(t.detach().requires_grad_() for t in as_tuple(z_star))
    with torch.enable_grad():
        ys = spec.check(f(like(spec, z_req), *inputs))
    vjp = VJPAt(ys, z_req, spec)
    point: Any = None
    extras: Sequence[Tensor] = ()
    if point_factory is not None:
        point, extras = point_factory(vjp)
    node = NodeState(rule, vjp, point, len(extras))
    out = _ImplicitBackward.apply(node, len(ys), *ys, *extras)
    return like(spec, list(out))


def reapply(node: NodeState, extras: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """A new node with the same backward as ``node`` (same ``y`` graph, same rule), created
    inside a ``create_graph`` backward: its outputs carry ``h*``'s dependence on θ and the
    inputs (the implicit map) into the graph being built."""
    ys = node.vjp.ys
    return _ImplicitBackward.apply(node, len(ys), *ys, *extras)  # type: ignore[no-any-return]
