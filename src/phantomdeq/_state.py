"""Tensor-or-tuple states and their flat ``(batch, dim)`` views.

A DEQ state is a tensor or a tuple of tensors that share a leading batch dimension (MDEQ keeps
one tensor per resolution). Solvers work on one flat ``(B, D)`` buffer so that norms, inner
products and Anderson/Broyden histories are single kernels. The buffer is allocated once per
solve; the structured state handed to ``f`` is a tuple of *views* into it, and ``f``'s output
is copied straight into a solver's history slot (or a fresh flat buffer) — no concatenation
per iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

State = Tensor | tuple[Tensor, ...]


@dataclass(frozen=True)
class StateSpec:
    """Structure of a state: per-part shapes (without batch), dtype, device, batch size."""

    is_tuple: bool
    shapes: tuple[torch.Size, ...]
    batch: int
    dtype: torch.dtype
    device: torch.device

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def of(z: State, *, name: str = "z0") -> StateSpec:
        """The structure of ``z``: a tensor or a non-empty tuple of tensors, each with a leading
        batch dimension and at least one feature dimension (shape ``(B, ...)``, ``dim() >= 2``),
        of one floating dtype and one device. Wrong types raise ``TypeError``, wrong shapes,
        dtypes or devices ``ValueError``."""
        if isinstance(z, list):
            raise TypeError(
                f"{name} must be a Tensor or a tuple of Tensors, got a list of {len(z)} "
                f"items; pass tuple({name})"
            )
        parts = as_tuple(z, name=name)
        if len(parts) == 0:
            raise ValueError(f"{name} must be a tensor or a non-empty tuple of tensors, got ()")
        first = parts[0]
        for i, p in enumerate(parts):
            where = f"{name}[{i}]" if isinstance(z, tuple) else name
            if p.dim() < 2:
                raise ValueError(
                    f"{where} has shape {tuple(p.shape)}: a state needs a leading batch "
                    "dimension and at least one feature dimension, shape (B, ...); for a batch "
                    f"of scalars pass {where}.unsqueeze(-1) (shape {(*p.shape, 1)})"
                )
            if p.shape[0] != first.shape[0]:
                raise ValueError(
                    f"{where} has shape {tuple(p.shape)}: every part needs the same leading "
                    f"batch size {first.shape[0]}"
                )
            if not p.is_floating_point():
                raise ValueError(f"{where} has dtype {p.dtype}; a state must be floating point")
            if p.dtype != first.dtype:
                raise ValueError(
                    f"{where} has dtype {p.dtype}, expected {first.dtype} like {name}[0]"
                )
            if p.device != first.device:
                raise ValueError(f"{where} is on {p.device}, expected {first.device}")
        return StateSpec(
            is_tuple=isinstance(z, tuple),
            shapes=tuple(p.shape[1:] for p in parts),
            batch=first.shape[0],
            dtype=first.dtype,
            device=first.device,
        )

    # ------------------------------------------------------------------ conversions
    def flatten(self, z: State, out: Tensor | None = None) -> Tensor:
        """Copy ``z`` into a ``(B, D)`` buffer (``out`` if given). One copy, no concatenation."""
        parts = as_tuple(z)
        if not self.is_tuple and out is None:
            return parts[0].reshape(self.batch, self.dim)
        if out is None:
            out = torch.empty(self.batch, self.dim, dtype=self.dtype, device=self.device)
        start = 0
        for p, size in zip(parts, self.sizes):
            out[:, start : start + size].copy_(p.reshape(self.batch, size))
            start += size
        return out

    def unflatten(self, flat: Tensor) -> State:
        """Views of ``flat`` (B, D) with the state's structure (no copy)."""
        b = flat.shape[0]
        if not self.is_tuple:
            return flat.view(b, *self.shapes[0])
        views = []
        start = 0
        for shape, size in zip(self.shapes, self.sizes):
            views.append(flat[:, start : start + size].view(b, *shape))
            start += size
        return tuple(views)

    def check(self, out: object, *, who: str = "f") -> tuple[Tensor, ...]:
        """Validate that ``out`` has exactly this structure; return it as a tuple of tensors."""
        if self.is_tuple:
            if not isinstance(out, tuple) or len(out) != len(self.shapes):
                got = (
                    f"a tuple of {len(out)} tensors"
                    if isinstance(out, tuple)
                    else type(out).__name__
                )
                error = ValueError if isinstance(out, tuple) else TypeError
                raise error(
                    f"{who} must return a tuple of {len(self.shapes)} tensors like z0, got {got}"
                )
            parts: tuple[object, ...] = out
        else:
            if not isinstance(out, Tensor):
                raise TypeError(f"{who} must return a Tensor like z0, got {type(out).__name__}")
            parts = (out,)
        for i, (p, shape) in enumerate(zip(parts, self.shapes)):
            where = f"{who} output[{i}]" if self.is_tuple else f"{who} output"
            if not isinstance(p, Tensor):
                raise TypeError(f"{where} must be a Tensor, got {type(p).__name__}")
            if p.shape[1:] != shape or p.shape[0] != self.batch:
                raise ValueError(
                    f"{where} has shape {tuple(p.shape)}, expected {(self.batch, *shape)} "
                    "(the shape of z0)"
                )
            if p.dtype != self.dtype:
                raise ValueError(f"{where} has dtype {p.dtype}, expected {self.dtype} (z0's dtype)")
        return parts  # type: ignore[return-value]


def as_tuple(z: State | Sequence[Tensor], *, name: str = "z") -> tuple[Tensor, ...]:
    if isinstance(z, Tensor):
        return (z,)
    if isinstance(z, tuple | list):
        for i, p in enumerate(z):
            if not isinstance(p, Tensor):
                raise TypeError(f"{name}[{i}] must be a Tensor, got {type(p).__name__}")
        return tuple(z)
    raise TypeError(f"{name} must be a Tensor or a tuple of Tensors, got {type(z).__name__}")


def like(spec: StateSpec, parts: Sequence[Tensor]) -> State:
    """Pack parts back into the structure described by ``spec``."""
    return tuple(parts) if spec.is_tuple else parts[0]


def tree_map(fn: Callable[..., Tensor], *states: State) -> State:
    """Apply ``fn`` part-wise to states of the same structure."""
    if isinstance(states[0], Tensor):
        return fn(*states)
    return tuple(fn(*ps) for ps in zip(*states))


def detach(z: State) -> State:
    return tree_map(lambda t: t.detach(), z)


FlatFn = Callable[..., Tensor]


def make_flat_fn(g: Callable[[State], object], spec: StateSpec, *, who: str = "f") -> FlatFn:
    """Wrap a structured map ``g`` into ``gf(x, out=None)``: ``(B, D) -> (B, D)``.

    With ``out`` (a solver's history slot) ``g``'s output is written there and ``out`` is
    returned: one copy of the state, no concatenation. Without ``out`` a single tensor comes
    back as ``g``'s own output, reshaped (free), and a tuple is copied into a fresh flat buffer.
    Solvers may keep the result.
    """
    if not spec.is_tuple:

        def flat_single(x: Tensor, out: Tensor | None = None) -> Tensor:
            (o,) = spec.check(g(spec.unflatten(x)), who=who)
            flat = o.reshape(spec.batch, spec.dim)
            return flat if out is None else out.copy_(flat)

        # without ``out`` the result is g's own output, no copy (solvers may fuse their first
        # pass over it instead of copying it into a history slot)
        flat_single.returns_output = True  # type: ignore[attr-defined]
        return flat_single

    def flat_tuple(x: Tensor, out: Tensor | None = None) -> Tensor:
        parts = spec.check(g(spec.unflatten(x)), who=who)
        if out is None:
            out = torch.empty(spec.batch, spec.dim, dtype=spec.dtype, device=spec.device)
        return spec.flatten(parts, out=out)

    return flat_tuple
