"""Second derivatives of the implicit map ``h*(θ, x)`` (IFT under ``create_graph=True``).

The first-order IFT gradient (paper eq. 4) is ``G(θ, x, g) = J_{θ,x}(h*, θ, x)ᵀ v`` with
``v = (I − J_hᵀ)⁻¹ g``. Differentiating ``G`` needs, besides the explicit dependence of ``J_θ``
on θ and x:

* ``v``'s dependence on ``g``, θ, x and ``h*``. ``v`` solves the linear fixed point
  ``v = J_hᵀ v + g``, itself an implicit system: for a cotangent ``c`` on ``v``, solve the
  adjoint system ``u = J_h u + c`` (Jacobian-*vector* products, by differentiating a
  ``create_graph`` VJP w.r.t. its cotangent), then ``ḡ = u`` and the cotangent of
  ``(h*, θ, x)`` is the gradient of ``⟨J_hᵀ(h*, θ, x) v, u⟩`` at fixed ``v, u``
  (:class:`AdjointSolve`).
* ``h*``'s own dependence on θ and x, i.e. the implicit map again: the terms that depend on
  ``h*`` are routed into a node whose backward is the (exact, recursive) IFT backward.

Everything is evaluated at fresh leaves ``z_r = h*``, ``x_r = x`` (partial derivatives);
:class:`Relink` then sends the cotangents that reach those leaves to the real ``h*`` node and
the real inputs. Third-order derivatives through the adjoint solve are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .._state import StateSpec, as_tuple, like


class AdjointSolver(Protocol):
    """Solves ``u = op(u) + rhs`` (flat ``(B, D)``) and checks the outcome; ``what`` names the
    solve in warnings and errors."""

    def solve(self, op: Callable[[Tensor], Tensor], rhs: Tensor, *, what: str) -> Tensor: ...


def tensors_requiring_grad(obj: object, found: list[Tensor]) -> None:
    """Append to ``found`` the tensors requiring grad inside ``obj`` (tuples, lists, dicts),
    each once. Identity tests with ``is``, not ``id()``: traced by ``torch.compile``, ``id()``
    of an input would make every new batch a recompilation."""
    if isinstance(obj, Tensor):
        if obj.requires_grad and not any(obj is t for t in found):
            found.append(obj)
    elif isinstance(obj, tuple | list):
        for item in obj:
            tensors_requiring_grad(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            tensors_requiring_grad(item, found)


def _substitute(obj: Any, repl: dict[int, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return repl.get(id(obj), obj)
    if isinstance(obj, tuple):
        return tuple(_substitute(item, repl) for item in obj)
    if isinstance(obj, list):
        return [_substitute(item, repl) for item in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, repl) for k, v in obj.items()}
    return obj


def _foreign_leaves(roots: Sequence[Tensor], allowed: set[int]) -> list[Tensor]:
    """Leaves requiring grad (``AccumulateGrad`` nodes) reached from ``roots`` whose tensor is not
    in ``allowed`` (ids): what ``f`` captured from outside its parameters and inputs."""
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[int] = set()
    keep: list[Any] = []  # hold the node objects so that their ids stay unique during the walk
    foreign: list[Tensor] = []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):  # AccumulateGrad
            if id(variable) not in allowed:
                foreign.append(variable)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None:
                stack.append(nxt)
    return foreign


class ImplicitPoint:
    """The point ``(h*, θ, x)`` of an IFT output, for re-evaluating ``F`` there with fresh leaves.

    ``params``: the parameters of ``f`` that require grad; ``xs``: the tensors requiring grad
    found in the inputs (inside tuples, lists and dicts), parameters of ``f`` excluded.
    """

    def __init__(
        self, f: Callable[..., Any], inputs: Sequence[Any], z: tuple[Tensor, ...], spec: StateSpec
    ) -> None:
        self.f = f
        self.inputs = tuple(inputs)
        self.z = tuple(t.detach() for t in z)
        self.spec = spec
        params = f.parameters() if isinstance(f, torch.nn.Module) else ()
        self.params = [p for p in params if p.requires_grad]
        found: list[Tensor] = []
        tensors_requiring_grad(self.inputs, found)
        self.xs = [t for t in found if not any(t is p for p in self.params)]

    @property
    def extras(self) -> list[Tensor]:
        return [*self.params, *self.xs]

    def evaluate(
        self, *, check: bool
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(y_r, z_r, x_r)``: ``y_r = F(z_r, θ, x_r)`` with fresh leaves ``z_r = h*``,
        ``x_r = x``. ``check``: refuse (RuntimeError) when ``y_r`` depends on a tensor requiring
        grad that is neither ``z_r``, ``x_r`` nor a parameter of ``f``."""
        z_r = tuple(t.detach().requires_grad_() for t in self.z)
        x_r = tuple(x.detach().requires_grad_() for x in self.xs)
        inputs = _substitute(self.inputs, {id(x): r for x, r in zip(self.xs, x_r)})
        with torch.enable_grad():
            y_r = self.spec.check(self.f(like(self.spec, z_r), *inputs))
        if check:
            allowed = {id(t) for t in (*z_r, *x_r, *self.params)}
            foreign = _foreign_leaves([y for y in y_r if y.requires_grad], allowed)
            if foreign:
                shapes = ", ".join(str(tuple(t.shape)) for t in foreign[:3])
                raise RuntimeError(
                    "IFT second-order gradient (create_graph=True): f depends on tensor(s) "
                    f"requiring grad that are neither its parameters nor DEQ inputs (shape "
                    f"{shapes}); their effect on h* cannot be differentiated. Pass such tensors "
                    "as inputs, deq(z0, x, extra), or make them parameters of f"
                )
        return y_r, z_r, x_r


def _vjp_graph(
    y_r: tuple[Tensor, ...], z_r: tuple[Tensor, ...], v: tuple[Tensor, ...]
) -> tuple[list[Tensor], list[int], tuple[Tensor, ...]]:
    """``w = J_hᵀ d`` with ``create_graph`` at a leaf ``d = v``: differentiable in ``d`` (gives
    ``J_h u``) and in ``z_r``, θ, ``x_r`` (gives the gradient of ``⟨J_hᵀ v, u⟩``).
    Returns the parts of ``w`` that carry a graph, their indices and ``d``."""
    d = tuple(p.detach().requires_grad_() for p in v)
    outs = [i for i, y in enumerate(y_r) if y.requires_grad]
    w_all = torch.autograd.grad(
        [y_r[i] for i in outs],
        z_r,
        [d[i] for i in outs],
        create_graph=True,
        allow_unused=True,
    )
    idx = [i for i, w in enumerate(w_all) if w is not None and w.requires_grad]
    return [w_all[i] for i in idx], idx, d  # type: ignore[misc]


def _flat_grads(
    spec: StateSpec, grads: Sequence[Tensor | None], like_ts: Sequence[Tensor]
) -> Tensor:
    parts = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like_ts)]
    return spec.flatten(like(spec, parts)).detach()


class AdjointSolve(torch.autograd.Function):
    """``v = (I − J_hᵀ)⁻¹ g`` as a differentiable function of ``g``, ``h*``, θ and x.

    Inputs ``(solver, vjp, point, n, *g, *anchors, *params, *xs)`` with ``n`` state parts in
    ``g`` and in ``anchors`` (tensors whose backward is the IFT of ``h*``); returns ``v`` (the
    state's parts). The forward solve uses ``vjp`` (products at ``h*``); the backward solves
    the adjoint system ``u = J_h u + c`` and returns ``u`` for ``g`` and the gradient of
    ``⟨J_hᵀ v, u⟩`` (``v, u`` fixed) for ``anchors``, θ and x.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        solver: AdjointSolver,
        vjp: Callable[[Tensor], Tensor],
        point: ImplicitPoint,
        n: int,
        *tensors: Tensor,
    ) -> tuple[Tensor, ...]:
        spec = point.spec
        g = spec.flatten(like(spec, list(tensors[:n]))).detach()
        v = solver.solve(vjp, g, what="backward")
        ctx.solver, ctx.point, ctx.n = solver, point, n
        ctx.v = tuple(p.clone() for p in as_tuple(spec.unflatten(v)))
        # params and inputs: saved for autograd's in-place modification check only
        ctx.save_for_backward(*tensors[2 * n :])
        return tuple(p.clone() for p in ctx.v)

    @staticmethod
    def backward(ctx: Any, *c: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "IFT: third-order derivatives (create_graph=True through the second-order "
                "backward) are not supported; use UPG/NPG/OneStep or BPTT for higher orders"
            )
        ctx.saved_tensors  # noqa: B018 -- raises if θ or x were modified in place since
        point: ImplicitPoint = ctx.point
        spec = point.spec
        y_r, z_r, x_r = point.evaluate(check=False)  # checked when this node was built
        with torch.enable_grad():
            w, idx, d = _vjp_graph(y_r, z_r, ctx.v)

        def jvp(u: Tensor) -> Tensor:  # J_h u
            if not w:
                return torch.zeros_like(u)
            us = as_tuple(spec.unflatten(u))
            out = torch.autograd.grad(
                w, d, [us[i] for i in idx], retain_graph=True, allow_unused=True
            )
            return _flat_grads(spec, out, d)

        cf = spec.flatten(like(spec, list(c))).detach()
        u = ctx.solver.solve(jvp, cf, what="adjoint")
        u_parts = tuple(p.clone() for p in as_tuple(spec.unflatten(u)))
        n_targets = len(z_r) + len(point.params) + len(x_r)
        if w:
            targets = [*z_r, *point.params, *x_r]
            grads: tuple[Tensor | None, ...] = torch.autograd.grad(
                w, targets, [u_parts[i] for i in idx], allow_unused=True
            )
        else:
            grads = (None,) * n_targets
        return (None, None, None, None, *u_parts, *grads)


class _Links:
    """The fresh leaves of a re-evaluation, aligned with the anchors they stand for."""

    def __init__(self, leaves: Sequence[Tensor]) -> None:
        self.leaves = tuple(leaves)


class Relink(torch.autograd.Function):
    """Identity on ``results`` that also sends to ``anchors[i]`` the cotangent that reaches
    ``links.leaves[i]`` through ``results``' graph.

    ``results`` were computed from fresh leaves standing for the anchors (partial derivatives);
    re-linking turns them into total derivatives: ``anchors`` get
    ``autograd.grad(results, leaves, c)``, and ``c`` continues through ``results`` as usual.
    Inputs ``(links, n_anchors, *anchors, *results)``.
    """

    @staticmethod
    def forward(ctx: Any, links: _Links, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.links, ctx.n = links, n
        results = tensors[n:]
        ctx.save_for_backward(*results)
        return tuple(r.detach().clone() for r in results)

    @staticmethod
    def backward(ctx: Any, *c: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        results = ctx.saved_tensors
        leaves = ctx.links.leaves
        live = [i for i, r in enumerate(results) if r.requires_grad]
        if live:
            to_anchor: tuple[Tensor | None, ...] = torch.autograd.grad(
                [results[i] for i in live],
                leaves,
                [c[i] for i in live],
                retain_graph=True,
                allow_unused=True,
                create_graph=torch.is_grad_enabled(),
            )
        else:
            to_anchor = (None,) * len(leaves)
        return (None, None, *to_anchor, *c)


def relink(
    anchors: Sequence[Tensor], leaves: Sequence[Tensor], results: Sequence[Tensor | None]
) -> list[Tensor | None]:
    """:class:`Relink` applied to the non-``None`` ``results``; ``None`` entries stay ``None``."""
    present = [i for i, r in enumerate(results) if r is not None]
    if not present:
        return list(results)
    out = Relink.apply(_Links(leaves), len(anchors), *anchors, *[results[i] for i in present])
    linked: list[Tensor | None] = [None] * len(results)
    for i, r in zip(present, out):
        linked[i] = r
    return linked
