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

TorchDEQ's semantics are options (``learn_scale``, ``clip``/``clip_value``, ``dim``,
``init="random"``; :func:`weight_norm`'s ``learn_scale``/``target_norm``/``clip``), so a model
normalised by ``torchdeq.norm.apply_norm`` has the same effective weights here for the same
parameters; :func:`phantomdeq.nn.apply_norm` / :func:`phantomdeq.nn.remove_norm` apply and remove
them over a whole model like TorchDEQ's functions of the same names.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validate import check_bool, check_choice, check_int

__all__ = ["SpectralNorm", "WeightNorm", "spectral_norm", "update_norms", "weight_norm"]

_MODES = ("scale", "bound")
_INITS = ("warm", "random")


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
        target: target spectral norm ``‖W‖₂`` (> 0); with ``learn_scale=True`` the initial
            value of the learned scale (TorchDEQ's ``target_norm``).
        n_power_iterations: power-iteration steps per update (≥ 1): per call of
            :func:`update_norms`, i.e. per DEQ forward pass in training mode. Ignored with
            ``exact=True``.
        exact: compute ``σ_max`` with an SVD at every call instead of power iteration.
        mode: ``"scale"`` sets ``‖W‖₂ = target``; ``"bound"`` enforces ``‖W‖₂ ≤ target``.
        batch_dims: number of leading dimensions of ``weight`` that index independent matrices.
        eps: numerical floor for norms (``σ_max`` included; TorchDEQ does not floor ``σ_max``,
            which differs only once a stale power iteration makes ``uᵀ W v ≤ eps``).
        learn_scale: learn the scale (TorchDEQ's default): a parameter ``scale`` with one entry
            per slice along ``dim`` (per output row of a linear layer), initialised to
            ``target``, replaces the fixed ``target``: ``W ↦ scale · W / σ_max(W)`` (each row
            rescaled by its own entry, so ``‖W‖₂`` is no longer fixed).
        clip: cap the factor multiplying ``W`` at ``clip_value`` (TorchDEQ's ``clip``):
            ``W ↦ min(clip_value, factor) · W``.
        clip_value: the cap used with ``clip=True`` (> 0).
        dim: the dimension of ``weight`` (among those after the batch dimensions) moved first
            before reading the weight as a ``(size(dim), -1)`` matrix; 1 for transposed
            convolutions, as in TorchDEQ and ``torch.nn.utils.spectral_norm``.
        init: how the power-iteration vectors start. ``"warm"``: drawn from a fixed-seed
            generator and advanced 15 steps on the initial weight (a good first ``σ_max``).
            ``"random"``: TorchDEQ's start: ``u`` then ``v`` drawn from torch's global random
            generator (``normal_`` on the weight's device and dtype), normalised, no warm-up
            steps; with the same seed they equal TorchDEQ's vectors.
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
        learn_scale: bool = False,
        clip: bool = False,
        clip_value: float = 1.0,
        dim: int = 0,
        init: str = "warm",
    ) -> None:
        super().__init__()
        self.target = _check_positive_finite("target", target)
        check_int("n_power_iterations", n_power_iterations, minimum=1)
        check_bool("exact", exact)
        check_choice("mode", mode, _MODES)
        check_int("batch_dims", batch_dims, minimum=0)
        check_bool("learn_scale", learn_scale)
        check_bool("clip", clip)
        self.clip_value = _check_positive_finite("clip_value", clip_value)
        check_int("dim", dim, minimum=0)
        check_choice("init", init, _INITS)
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
        if weight.dim() < batch_dims + 2:
            raise ValueError(
                f"weight must have at least batch_dims + 2 = {batch_dims + 2} dimensions "
                f"(a matrix per batch entry), got shape {tuple(weight.shape)}"
            )
        if batch_dims + dim >= weight.dim():
            raise ValueError(
                f"dim must be in [0, {weight.dim() - batch_dims - 1}] for a weight of shape "
                f"{tuple(weight.shape)} with batch_dims={batch_dims}, got {dim!r}"
            )
        if not weight.is_floating_point():
            raise ValueError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
        self.n_power_iterations = int(n_power_iterations)
        self.exact = bool(exact)
        self.mode = mode
        self.batch_dims = int(batch_dims)
        self.eps = _check_positive_finite("eps", eps)
        self.learn_scale = bool(learn_scale)
        self.clip = bool(clip)
        self.dim = int(dim)
        self.init = init
        mat = self._as_matrix(weight.detach())
        batch_shape, (rows, cols) = mat.shape[:-2], mat.shape[-2:]
        if init == "random":
            u = weight.detach().new_empty(*batch_shape, rows).normal_(0, 1)
            v = weight.detach().new_empty(*batch_shape, cols).normal_(0, 1)
        else:
            gen = torch.Generator(device="cpu").manual_seed(0)
            u = torch.randn(*batch_shape, rows, generator=gen, dtype=weight.dtype)
            v = torch.randn(*batch_shape, cols, generator=gen, dtype=weight.dtype)
        u = nn.functional.normalize(u, dim=-1, eps=self.eps).to(weight.device)
        v = nn.functional.normalize(v, dim=-1, eps=self.eps).to(weight.device)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.scale: nn.Parameter | None = None
        if self.learn_scale:
            shape = [1] * weight.dim()
            shape[: self.batch_dims] = weight.shape[: self.batch_dims]
            shape[self.batch_dims + self.dim] = rows
            self.scale = nn.Parameter(
                torch.full(shape, self.target, dtype=weight.dtype, device=weight.device)
            )
        if not self.exact and init == "warm":
            # A good starting estimate, as torch's own spectral norm does.
            self._power_iteration(mat, 15)

    def _as_matrix(self, weight: Tensor) -> Tensor:
        if self.dim != 0:
            lead = self.batch_dims + self.dim
            order = [*range(self.batch_dims), lead]
            order += [d for d in range(self.batch_dims, weight.dim()) if d != lead]
            weight = weight.permute(*order)
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
        sigma = sigma.reshape(*sigma.shape, *([1] * (weight.dim() - self.batch_dims)))
        target: Tensor | float = self.target if self.scale is None else self.scale
        if self.mode == "scale":
            factor = target / sigma
        else:
            factor = 1.0 / torch.clamp(sigma / target, min=1.0)
        if self.clip:
            factor = torch.clamp(factor, max=self.clip_value)
        return weight * factor

    def extra_repr(self) -> str:
        extra = ""
        if self.learn_scale:
            extra += ", learn_scale=True"
        if self.clip:
            extra += f", clip_value={self.clip_value}"
        if self.dim:
            extra += f", dim={self.dim}"
        return (
            f"target={self.target}, mode={self.mode!r}, exact={self.exact}, "
            f"n_power_iterations={self.n_power_iterations}, batch_dims={self.batch_dims}"
            f"{extra}, init={self.init!r}"
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
    learn_scale: bool = False,
    clip: bool = False,
    clip_value: float = 1.0,
    dim: int = 0,
    init: str = "warm",
) -> nn.Module:
    """Rescale ``module.<name>`` to spectral norm ``lipschitz`` (a registered parametrization).

    ``module.<name>`` becomes ``lipschitz · W / σ_max(W)`` (``mode="scale"``) or
    ``W / max(1, σ_max(W)/lipschitz)`` (``mode="bound"``); the raw tensor lives in
    ``module.parametrizations.<name>.original`` and receives the gradients. A linear map
    ``h ↦ W h`` then has Lipschitz constant ``lipschitz`` (or at most that); compose with the
    activation's constant for the layer (Sec. 2.1: ``L_h < 1`` makes ``F`` a contraction).

    TorchDEQ's spectral norm is ``learn_scale=True, init="random"`` with ``lipschitz`` its
    ``target_norm`` (and ``clip``, ``clip_value``, ``n_power_iterations``, ``eps`` its options of
    the same names; ``dim=1`` for transposed convolutions): the learned per-row scale is
    ``module.parametrizations.<name>[0].scale`` (TorchDEQ's ``<name>_g``), and the layer is then
    no longer held at a fixed Lipschitz constant. :func:`phantomdeq.nn.apply_norm` does this
    over a whole model.

    Returns the module (modified in place). See :class:`SpectralNorm` for the options.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"name must name a tensor attribute of the module, got {name!r}")
    param = SpectralNorm(
        weight,
        target=_check_positive_finite("lipschitz", lipschitz),
        n_power_iterations=n_power_iterations,
        exact=exact,
        mode=mode,
        batch_dims=batch_dims,
        eps=eps,
        learn_scale=learn_scale,
        clip=clip,
        clip_value=clip_value,
        dim=dim,
        init=init,
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


def _norm_except(weight: Tensor, dim: int | None) -> Tensor:
    """The 2-norm of ``weight`` over every dimension but ``dim`` (kept, size 1 elsewhere);
    over the whole tensor (a 0-d tensor) for ``dim=None``."""
    if dim is None:
        return torch.linalg.vector_norm(weight)
    others = [d for d in range(weight.dim()) if d != dim % weight.dim()]
    return torch.linalg.vector_norm(weight, dim=others, keepdim=True)


class WeightNorm(nn.Module):
    """Weight-normalisation parametrization with TorchDEQ's options.

    ``learn_scale=True``: ``W = g · V / ‖V‖`` with the magnitude ``g`` (``original0``, initialised
    to ``‖W‖``, so the initial weight is unchanged) and the direction ``V`` (``original1``);
    ``learn_scale=False``: ``W = target_norm · V / ‖V‖`` with ``V`` the only tensor
    (``original``). ``clip=True`` caps the factor multiplying ``V`` at ``clip_value``:
    ``W = min(clip_value, g / ‖V‖) · V``. The norm runs over every dimension but ``dim``
    (``None``: the whole tensor). Built by :func:`weight_norm` when an option other than
    ``torch.nn.utils.parametrizations.weight_norm``'s is asked for.
    """

    def __init__(
        self,
        dim: int | None = 0,
        *,
        learn_scale: bool = True,
        target_norm: float = 1.0,
        clip: bool = False,
        clip_value: float = 1.0,
    ) -> None:
        super().__init__()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise TypeError(f"dim must be None or an int, got {type(dim).__name__} {dim!r}")
        self.dim = dim
        self.learn_scale = check_bool("learn_scale", learn_scale)
        self.target_norm = _check_positive_finite("target_norm", target_norm)
        self.clip = check_bool("clip", clip)
        self.clip_value = _check_positive_finite("clip_value", clip_value)

    def _factor(self, scale: Tensor | float, v: Tensor) -> Tensor:
        factor = scale / _norm_except(v, self.dim)
        if self.clip:
            factor = torch.clamp(factor, max=self.clip_value)
        return factor

    def forward(self, *tensors: Tensor) -> Tensor:
        if self.learn_scale:
            g, v = tensors
            return v * self._factor(g, v)
        (v,) = tensors
        return v * self._factor(self.target_norm, v)

    def right_inverse(self, weight: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.learn_scale:
            return _norm_except(weight, self.dim), weight
        return weight

    def extra_repr(self) -> str:
        clip = f", clip_value={self.clip_value}" if self.clip else ""
        if self.learn_scale:
            return f"dim={self.dim}, learn_scale=True{clip}"
        return f"dim={self.dim}, learn_scale=False, target_norm={self.target_norm}{clip}"


def weight_norm(
    module: nn.Module,
    name: str = "weight",
    dim: int | None = 0,
    *,
    learn_scale: bool = True,
    target_norm: float = 1.0,
    clip: bool = False,
    clip_value: float = 1.0,
) -> nn.Module:
    """Weight normalisation ``W = g · V / ‖V‖`` (Salimans & Kingma), as a parametrization.

    With the defaults, a thin, validated wrapper over
    :func:`torch.nn.utils.parametrizations.weight_norm`: the magnitude ``g`` is
    ``module.parametrizations.<name>.original0`` and the direction ``V`` is ``original1``;
    ``dim`` is the dimension kept by the norm (``None``: the whole tensor).

    TorchDEQ's options (same names, same defaults, same effective weight): ``learn_scale=False``
    fixes the magnitude at ``target_norm`` (``W = target_norm · V / ‖V‖``, ``V`` is then
    ``original``; ``target_norm`` is unused while the scale is learned, as in TorchDEQ);
    ``clip=True`` caps the factor ``g / ‖V‖`` at ``clip_value``. These use :class:`WeightNorm`.
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
    param = WeightNorm(
        dim, learn_scale=learn_scale, target_norm=target_norm, clip=clip, clip_value=clip_value
    )
    if learn_scale and not clip:
        return nn.utils.parametrizations.weight_norm(module, name=name, dim=dim)  # type: ignore[arg-type]
    parametrize.register_parametrization(module, name, param)
    return module
