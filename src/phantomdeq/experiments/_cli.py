"""Helpers shared by the experiment commands: one-line messages for refused options."""

from __future__ import annotations

import pydantic

__all__ = ["validation_message"]


def validation_message(exc: pydantic.ValidationError, *, flags: bool = False) -> str:
    """One line naming every refused option -- as ``--flag-name`` when ``flags`` (the command
    line), else as the field name -- with what is allowed and the value given."""
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "options"
        name = f"--{field.replace('_', '-')}" if flags else field
        parts.append(f"{name}: {err['msg']} (got {err['input']!r})")
    return "; ".join(parts)
