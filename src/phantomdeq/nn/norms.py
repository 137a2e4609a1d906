"""Weight normalisations for implicit layers.

The analysis of the paper (Sec. 2.1) assumes that the layer ``F`` is a contraction in ``h``,
i.e. its Lipschitz constant ``L_h`` is below one. For ``F(h) = σ(W h + ...)`` with a
``c``-Lipschitz activation ``σ``, ``L_h ≤ c · ‖W‖₂``, so rescaling ``W`` to a target spectral norm
fixes ``L_h``; the synthetic setting of Sec. 3 ("Precision of the Phantom Gradient") uses
``L_h = 0.9``. :class:`SpectralNorm` is that rescaling as a ``torch.nn.utils.parametrize``
parametrization,

    W  ↦  target · W / σ_max(W)          (mode="scale")
    W  ↦  W / max(1, σ_max(W) / target)  (mode="bound": only ever shrinks W),

with ``σ_max`` from persistent power iteration or from an exact SVD (``exact=True``).

The power iteration holds still while a DEQ solves: evaluating the parametrized weight never
advances it (a fixed point of a map that changes during the solve is not the fixed point the
gradient assumes, and the IFT backward re-evaluates ``F``). It advances only in
:func:`update_norms`, which :class:`phantomdeq.DEQ` calls once per forward pass in training mode
(before the solve) on its cell — so the solve, the phantom-gradient unroll and the backward all
see one weight, and the estimate of ``σ_max`` improves by ``n_power_iterations`` steps per
training step. Outside a DEQ, call :func:`update_norms` once per training step yourself. A weight with more than two dimensions is read as a matrix of shape
``(out, -1)`` (for a convolution this is the usual surrogate, *not* the operator norm of the
convolution); leading ``batch_dims`` dimensions hold independent matrices, each normalised on
its own (used by the batched synthetic problems of :mod:`phantomdeq.models.synthetic`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validate import check_bool, check_choice, check_int

__all__ = ["SpectralNorm", "spectral_norm", "update_norms", "weight_norm"]

_MODES = ("scale", "bound")


def _check_positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a finite number > 0, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


class SpectralNorm(nn.Module):
    """Parametrization rescaling a weight to a target spectral norm (Lipschitz constant).

    Args:
        weight: the weight to be parametrized (used for shapes and to initialise the power
            iteration vectors; it is not stored).
        target: target spectral norm ``‖W‖₂`` (> 0).
        n_power_iterations: power-iteration steps per update (≥ 1): per call of
            :func:`update_norms`, i.e. per DEQ forward pass in training mode. Ignored with
            ``exact=True``.
        exact: compute ``σ_max`` with an SVD at every call instead of power iteration.
        mode: ``"scale"`` sets ``‖W‖₂ = target``; ``"bound"`` enforces ``‖W‖₂ ≤ target``.
        batch_dims: number of leading dimensions of ``weight`` that index independent matrices.
        eps: numerical floor for norms.
    """

    u: Tensor
    v: Tensor

    def __init__(
        self,
        weight: Tensor,
        *,
        target: float = 1.0,
        n_power_iterations: int = 1,
        exact: bool = False,
        mode: str = "scale",
        batch_dims: int = 0,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.target = _check_positive_finite("target", target)
        check_int("n_power_iterations", n_power_iterations, minimum=1)
        check_bool("exact", exact)
        check_choice("mode", mode, _MODES)
        check_int("batch_dims", batch_dims, minimum=0)
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
        if weight.dim() < batch_dims + 2:
            raise ValueError(
                f"weight must have at least batch_dims + 2 = {batch_dims + 2} dimensions "
                f"(a matrix per batch entry), got shape {tuple(weight.shape)}"
            )
        if not weight.is_floating_point():
            raise ValueError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
        self.n_power_iterations = int(n_power_iterations)
        self.exact = bool(exact)
        self.mode = mode
        self.batch_dims = int(batch_dims)
        self.eps = _check_positive_finite("eps", eps)
        mat = self._as_matrix(weight.detach())
        batch_shape, (rows, cols) = mat.shape[:-2], mat.shape[-2:]
        gen = torch.Generator(device="cpu").manual_seed(0)
        u = torch.randn(*batch_shape, rows, generator=gen, dtype=weight.dtype)
        v = torch.randn(*batch_shape, cols, generator=gen, dtype=weight.dtype)
        self.register_buffer("u", nn.functional.normalize(u, dim=-1).to(weight.device))
        self.register_buffer("v", nn.functional.normalize(v, dim=-1).to(weight.device))
        if not self.exact:
            # A good starting estimate, as torch's own spectral norm does.
            self._power_iteration(mat, 15)

    def _as_matrix(self, weight: Tensor) -> Tensor:
        shape = weight.shape
        return weight.reshape(*shape[: self.batch_dims], shape[self.batch_dims], -1)

    @torch.no_grad()
    def power_step(self, weight: Tensor) -> None:
        """Advance the power iteration by ``n_power_iterations`` steps on ``weight`` (the
        parametrization's input). Called by :func:`update_norms`; no-op with ``exact=True``."""
        if not self.exact:
            self._power_iteration(self._as_matrix(weight.detach()), self.n_power_iterations)

    @torch.no_grad()
    def _power_iteration(self, mat: Tensor, steps: int) -> None:
        for _ in range(steps):
            v = torch.einsum("...ij,...i->...j", mat, self.u)
            self.v.copy_(nn.functional.normalize(v, dim=-1, eps=self.eps))
            u = torch.einsum("...ij,...j->...i", mat, self.v)
            self.u.copy_(nn.functional.normalize(u, dim=-1, eps=self.eps))

    def sigma(self, weight: Tensor) -> Tensor:
        """Largest singular value of each matrix in ``weight`` (shape ``weight.shape[:batch_dims]``).

        With power iteration this is ``uᵀ W v`` with the current vectors (which only
        :meth:`power_step` advances); gradients flow through ``W`` only, as in Miyato et al.
        """
        mat = self._as_matrix(weight)
        if self.exact:
            return torch.linalg.matrix_norm(mat, ord=2)
        u = self.u.clone(memory_format=torch.contiguous_format)
        v = self.v.clone(memory_format=torch.contiguous_format)
        return torch.einsum("...i,...ij,...j->...", u, mat, v)

    def forward(self, weight: Tensor) -> Tensor:
        sigma = self.sigma(weight).clamp_min(self.eps)
        if self.mode == "scale":
            factor = self.target / sigma
        else:
            factor = 1.0 / torch.clamp(sigma / self.target, min=1.0)
        return weight * factor.reshape(*factor.shape, *([1] * (weight.dim() - self.batch_dims)))

    def extra_repr(self) -> str:
        return (
            f"target={self.target}, mode={self.mode!r}, exact={self.exact}, "
            f"n_power_iterations={self.n_power_iterations}, batch_dims={self.batch_dims}"
        )


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    *,
    lipschitz: float = 1.0,
    n_power_iterations: int = 1,
    exact: bool = False,
    mode: str = "scale",
    batch_dims: int = 0,
    eps: float = 1e-12,
) -> nn.Module:
    """Rescale ``module.<name>`` to spectral norm ``lipschitz`` (a registered parametrization).

    ``module.<name>`` becomes ``lipschitz · W / σ_max(W)`` (``mode="scale"``) or
    ``W / max(1, σ_max(W)/lipschitz)`` (``mode="bound"``); the raw tensor lives in
    ``module.parametrizations.<name>.original`` and receives the gradients. A linear map
    ``h ↦ W h`` then has Lipschitz constant ``lipschitz`` (or at most that); compose with the
    activation's constant for the layer (Sec. 2.1: ``L_h < 1`` makes ``F`` a contraction).

    Returns the module (modified in place). See :class:`SpectralNorm` for the options.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"name must name a tensor attribute of the module, got {name!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    param = SpectralNorm(
        weight,
        target=_check_positive_finite("lipschitz", lipschitz),
        n_power_iterations=n_power_iterations,
        exact=exact,
        mode=mode,
        batch_dims=batch_dims,
        eps=eps,
    )
    parametrize.register_parametrization(module, name, param)
    return module


def update_norms(module: nn.Module) -> int:
    """Advance the power iteration of every :class:`SpectralNorm` parametrization inside
    ``module`` that is in training mode by one update (``n_power_iterations`` steps), on the
    current raw weight. Returns the number of parametrizations updated.

    :class:`phantomdeq.DEQ` calls this on its cell once per forward pass in training mode,
    before the solve; evaluating the weights never advances the iteration by itself.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    count = 0
    for owner in module.modules():
        if not parametrize.is_parametrized(owner):
            continue
        for plist in owner.parametrizations.values():  # type: ignore[union-attr,operator]
            if not isinstance(plist, parametrize.ParametrizationList):
                continue
            chain = list(plist)
            todo = [i for i, p in enumerate(chain) if isinstance(p, SpectralNorm) and p.training]
            if not todo:
                continue
            with torch.no_grad():
                if plist.is_tensor:
                    originals: tuple[Tensor, ...] = (plist.original,)
                else:
                    originals = tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))
                x: Tensor | None = None
                for i, p in enumerate(chain[: todo[-1] + 1]):
                    if isinstance(p, SpectralNorm) and i in todo:
                        if x is None and len(originals) != 1:
                            raise TypeError(
                                "update_norms: a SpectralNorm that is first in a parametrization "
                                "chain needs a single original tensor"
                            )
                        p.power_step(originals[0] if x is None else x)
                        count += 1
                    x = p(*originals) if x is None else p(x)
    return count


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Weight normalisation ``W = g · V / ‖V‖`` (Salimans & Kingma), as a parametrization.

    A thin, validated wrapper over :func:`torch.nn.utils.parametrizations.weight_norm`: the
    magnitude ``g`` is ``module.parametrizations.<name>.original0`` and the direction ``V`` is
    ``original1``; ``dim`` is the dimension kept by the norm (``None``: the whole tensor).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"name must name a tensor attribute of the module, got {name!r}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
        raise TypeError(f"dim must be None or an int, got {type(dim).__name__} {dim!r}")
    if dim is not None and not -weight.dim() <= dim < weight.dim():
        raise ValueError(
            f"dim must be None or in [{-weight.dim()}, {weight.dim() - 1}] for a weight of "
            f"shape {tuple(weight.shape)}, got {dim!r}"
        )
    return nn.utils.parametrizations.weight_norm(module, name=name, dim=dim)  # type: ignore[arg-type]
