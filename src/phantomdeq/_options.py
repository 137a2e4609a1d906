"""Where a solver's or an estimator's options are declared: the keyword-only parameters of its
constructor (name, type annotation, default). The registries expose them
(``pdq.solvers.options``, ``pdq.grad.options``) and everything else -- the training config,
``--set``, the ablation grid, the cost table's method list and the messages naming the allowed
options -- is derived from them; the class validates the values."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["keyword_options", "registry_options", "unknown_options"]


def keyword_options(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword-only constructor parameters of ``cls`` in declaration order, with their
    annotations evaluated (``from __future__ import annotations`` leaves them as strings)."""
    sig = inspect.signature(cls.__init__, eval_str=True)  # type: ignore[misc]
    return {
        name: p for name, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def unknown_options(cls: type, options: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming ``options`` that ``cls`` does not declare, and the allowed."""
    allowed = list(keyword_options(cls))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for {what}; allowed: {', '.join(allowed) or 'none'}"
        )


def registry_options(
    registry: dict[str, type], name: str, what: str
) -> dict[str, inspect.Parameter]:
    """:func:`keyword_options` of ``registry[name]``; an unknown ``name`` is a ``ValueError``
    naming the allowed ones."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(registry)}")
    return keyword_options(registry[name])
