"""Normalise, or stop normalising, every layer of a model at once (TorchDEQ's ``apply_norm`` /
``remove_norm``).

:func:`apply_norm` walks ``model.named_modules()`` and normalises the weight of every module
whose type is *exactly* one of the target types (a subclass is not matched, as in TorchDEQ):
``nn.Linear`` and ``nn.Conv1d/2d/3d`` along dimension 0, ``nn.ConvTranspose1d/2d/3d`` along
dimension 1. Modules whose name starts with an entry of ``prefix_filter_out`` or contains an
entry of ``filter_out`` are skipped. The defaults are TorchDEQ 0.1.0's (weight norm with a
learned scale; spectral norm with a learned per-row scale initialised to ``target_norm``,
power-iteration vectors drawn from the global generator), so with the same seed the model is
the same one TorchDEQ would build. The norms are ``torch.nn.utils.parametrize``
parametrizations (:func:`~phantomdeq.nn.spectral_norm`, :func:`~phantomdeq.nn.weight_norm`);
there is no ``reset_norm`` to call: the weights are recomputed on access, and
:class:`phantomdeq.DEQ` advances the spectral norms' power iteration once per training forward
pass (:func:`~phantomdeq.nn.update_norms` outside a DEQ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from .._validate import check_choice
from .norms import SpectralNorm, WeightNorm, spectral_norm, weight_norm

__all__ = ["NORM_TARGETS", "apply_norm", "remove_norm"]

NORM_TARGETS: dict[type[nn.Module], tuple[str, int]] = {
    nn.Linear: ("weight", 0),
    nn.Conv1d: ("weight", 0),
    nn.Conv2d: ("weight", 0),
    nn.Conv3d: ("weight", 0),
    nn.ConvTranspose1d: ("weight", 1),
    nn.ConvTranspose2d: ("weight", 1),
    nn.ConvTranspose3d: ("weight", 1),
}
"""The module types :func:`apply_norm` normalises by default: ``type -> (tensor name, dim)``
(TorchDEQ's ``_target_modules``; pass ``targets=`` to change it, TorchDEQ's
``register_norm_module``)."""

_NORM_TYPES = ("weight_norm", "spectral_norm", "none")
_NORM_CLASSES = (SpectralNorm, WeightNorm, _WeightNorm)


def _names(value: str | Sequence[str] | None, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{field} must be None, a str or a list of str, got {value!r}")
    return list(value)


def apply_norm(
    model: nn.Module,
    norm_type: str = "weight_norm",
    prefix_filter_out: str | Sequence[str] | None = None,
    filter_out: str | Sequence[str] | None = None,
    *,
    learn_scale: bool = True,
    target_norm: float = 1.0,
    clip: bool = False,
    clip_value: float = 1.0,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    init: str = "random",
    targets: Mapping[type[nn.Module], tuple[str, int]] | None = None,
) -> list[str]:
    """Normalise the weight of every target module of ``model`` (TorchDEQ's ``apply_norm``).

    Args:
        model: the model, modified in place.
        norm_type: ``"weight_norm"`` (TorchDEQ's default), ``"spectral_norm"`` or ``"none"``.
        prefix_filter_out: skip modules whose qualified name starts with this (or any of these).
        filter_out: skip modules whose qualified name contains this (or any of these).
        learn_scale: TorchDEQ's option, same default (see :func:`~phantomdeq.nn.weight_norm`
            and :func:`~phantomdeq.nn.spectral_norm`, as for the next three).
        target_norm: TorchDEQ's option, same default (spectral norm's ``lipschitz``).
        clip: TorchDEQ's option, same default.
        clip_value: TorchDEQ's option, same default.
        n_power_iterations: spectral norm only: power-iteration steps per update (TorchDEQ's
            option, same default).
        eps: spectral norm only: the normalisation's epsilon (TorchDEQ's option, same default).
        init: spectral norm only: ``"random"`` is TorchDEQ's start of the power iteration,
            ``"warm"`` this library's 15-step warm start.
        targets: ``type -> (tensor name, dim)`` replacing :data:`NORM_TARGETS`.

    Returns the qualified names of the modules normalised, in ``named_modules()`` order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("norm_type", norm_type, _NORM_TYPES, owner="apply_norm")
    prefixes = _names(prefix_filter_out, "prefix_filter_out")
    parts = _names(filter_out, "filter_out")
    table = dict(NORM_TARGETS if targets is None else targets)
    if norm_type == "none":
        return []
    if norm_type == "weight_norm" and (n_power_iterations != 1 or eps != 1e-12 or init != "random"):
        raise ValueError(
            "apply_norm: n_power_iterations, eps and init are spectral_norm options; "
            "norm_type='weight_norm' takes learn_scale, target_norm, clip, clip_value"
        )
    done: list[str] = []
    # named_modules() is a generator over the live tree; registering a parametrization adds
    # children, so take the list first.
    for qualified, module in list(model.named_modules()):
        if any(qualified.startswith(p) for p in prefixes) or any(s in qualified for s in parts):
            continue
        entry = table.get(type(module))
        if entry is None:
            continue
        name, dim = entry
        if norm_type == "weight_norm":
            weight_norm(
                module,
                name,
                dim,
                learn_scale=learn_scale,
                target_norm=target_norm,
                clip=clip,
                clip_value=clip_value,
            )
        else:
            spectral_norm(
                module,
                name,
                lipschitz=target_norm,
                n_power_iterations=n_power_iterations,
                eps=eps,
                learn_scale=learn_scale,
                clip=clip,
                clip_value=clip_value,
                dim=dim,
                init=init,
            )
        done.append(qualified)
    return done


def remove_norm(model: nn.Module) -> list[str]:
    """Remove every weight or spectral norm of ``model`` (TorchDEQ's ``remove_norm``), keeping the
    current effective weight as a plain parameter (no power-iteration step is taken).

    A tensor whose parametrization chain also holds a parametrization other than these norms is
    refused (``ValueError`` naming it) and nothing is removed. Returns the qualified names of
    the modules changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    todo: list[tuple[str, nn.Module, str]] = []
    for qualified, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():  # type: ignore[union-attr,operator]
            kinds = [isinstance(p, _NORM_CLASSES) for p in chain]
            if not any(kinds):
                continue
            if not all(kinds):
                others = [type(p).__name__ for p in chain if not isinstance(p, _NORM_CLASSES)]
                raise ValueError(
                    f"remove_norm: {qualified or 'model'}.{tensor_name} is also parametrized by "
                    f"{others}; remove those first (torch.nn.utils.parametrize)"
                )
            todo.append((qualified, module, tensor_name))
    for _, module, tensor_name in todo:
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return list(dict.fromkeys(q for q, _, _ in todo))
