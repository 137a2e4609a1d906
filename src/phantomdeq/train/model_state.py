"""Putting a checkpoint's weights into a freshly built model, with one-line errors.

``load_state_dict`` on a checkpoint of another architecture lists every mismatching tensor (49
lines for MDEQ-Tiny); :func:`load_model_weights` instead names the config keys that differ
between the checkpoint's stored config and the requested one, with a count and the first
example of the tensors that differ. :func:`check_finite_weights` refuses weights holding NaN or
inf, naming the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .checkpoint import CheckpointError
from .config import Config, config_differences
from .guard import nonfinite_entries

__all__ = ["check_finite_weights", "load_model_weights"]


def _architecture_keys(stored: Config, requested: Config) -> list[str]:
    """Config keys that differ and decide the model's tensors: ``model.*`` and the data set
    (input channels, classes)."""
    return [
        k
        for k in config_differences(stored, requested)
        if k.startswith("model") or k in ("data.name", "data.image_size")
    ]


def load_model_weights(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    *,
    source: str,
    stored: Config | None = None,
    requested: Config | None = None,
) -> None:
    """``model.load_state_dict(weights)`` or a one-line :class:`CheckpointError` naming
    ``source`` (the checkpoint file), the differing config keys when ``stored`` and ``requested``
    configs are given, and the mismatching tensors (count and first example)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if not (missing or unexpected or reshaped):
        try:
            model.load_state_dict(dict(weights))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else ""
            raise CheckpointError(
                f"checkpoint {source!r} does not load into the model: {first}"
            ) from exc
        return
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} tensor(s) differ in shape, e.g. {k!r}: "
            f"{list(weights[k].shape)} in the checkpoint, {list(own[k].shape)} in the model"
        )
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint, e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model, e.g. {unexpected[0]!r}")
    detail = "; ".join(parts)
    keys = _architecture_keys(stored, requested) if stored and requested else []
    if keys:
        raise CheckpointError(
            f"checkpoint {source!r} holds another model than the one requested: "
            f"{', '.join(keys)} differ(s) from the checkpoint's config ({detail}); "
            f"drop those --set overrides"
        )
    name = (
        (requested.model.name or requested.model.target)
        if requested is not None
        else type(model).__name__
    )
    raise CheckpointError(
        f"checkpoint {source!r} does not match the model {name!r} built from its config ({detail})"
    )


def check_finite_weights(model: nn.Module, *, source: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN/inf (one line naming ``source``)."""
    bad = nonfinite_entries(model)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(
            f"checkpoint {source!r} holds non-finite values (NaN/inf) in {bad[0]!r}{more}; "
            f"it is a diverged model and cannot be evaluated, use an earlier checkpoint"
        )
