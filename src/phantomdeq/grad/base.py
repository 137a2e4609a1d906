"""The gradient-estimator interface and the shared custom autograd Function used by IFT and NPG."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._state import State, StateSpec, as_tuple, like

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


class GradientEstimator:
    """How the DEQ output gets its gradient.

    :meth:`attach` receives ``f``, the detached forward solution ``z_star`` and the extra inputs,
    and returns a state whose autograd graph carries the estimator's gradient to ``f``'s
    parameters and to the inputs.
    """

    name = "estimator"
    #: BPTT needs the forward solve itself to be recorded; the DEQ module handles that case.
    tracks_forward = False

    def attach(self, f: Cell, z_star: State, inputs: Sequence[Any], spec: StateSpec) -> State:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict[str, object]:
        return {}


class BackwardRule:
    """Maps the incoming gradient ``g`` (flat, (B, D)) at the DEQ output to the vector ``v`` that
    is then back-propagated through one tracked evaluation ``y = f(z*)``.

    ``vjp(w)`` returns ``wᵀ ∂f/∂z`` at ``z*`` (flat), reusing the graph of ``y``.
    """

    def __call__(self, g: Tensor, vjp: Callable[[Tensor], Tensor]) -> Tensor:
        raise NotImplementedError


class _VJPAt:
    """Vector-Jacobian products of ``f`` at ``z*`` on the retained graph of ``y = f(z*)``."""

    def __init__(self, ys: tuple[Tensor, ...], z_req: tuple[Tensor, ...], spec: StateSpec) -> None:
        self.ys = ys
        self.z_req = z_req
        self.spec = spec

    def __call__(self, w: Tensor) -> Tensor:
        ws = as_tuple(self.spec.unflatten(w))
        grads = torch.autograd.grad(self.ys, self.z_req, ws, retain_graph=True, allow_unused=True)
        parts = [torch.zeros_like(z) if gr is None else gr for gr, z in zip(grads, self.z_req)]
        return self.spec.flatten(like(self.spec, parts)).detach()


class _ImplicitBackward(torch.autograd.Function):
    """Identity in the forward pass on ``y = f(z*)``; in the backward pass, replaces the incoming
    gradient ``g`` by ``rule(g)`` before autograd continues through ``y`` to ``θ`` and inputs."""

    @staticmethod
    def forward(ctx: Any, rule: BackwardRule, vjp: _VJPAt, *ys: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.rule = rule
        ctx.vjp = vjp
        return tuple(y.detach().clone() for y in ys)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        vjp: _VJPAt = ctx.vjp
        spec = vjp.spec
        g = spec.flatten(like(spec, list(grads))).detach()
        with torch.enable_grad():
            v = ctx.rule(g, vjp)
        parts = as_tuple(spec.unflatten(v))
        return (None, None, *parts)


def attach_rule(
    rule: BackwardRule, f: Cell, z_star: State, inputs: Sequence[Any], spec: StateSpec
) -> State:
    """Output ``y = f(z*)`` (tracked to θ and inputs) whose incoming gradient is mapped by ``rule``."""
    z_req = tuple(t.detach().requires_grad_() for t in as_tuple(z_star))
    with torch.enable_grad():
        ys = spec.check(f(like(spec, z_req), *inputs))
    vjp = _VJPAt(ys, z_req, spec)
    out = _ImplicitBackward.apply(rule, vjp, *ys)
    return like(spec, list(out))
