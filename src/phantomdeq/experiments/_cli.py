"""Helpers shared by the experiment commands: one-line messages for refused options."""

from __future__ import annotations

import argparse
from typing import Any

import pydantic

__all__ = ["add_flags", "validation_message"]


def add_flags(
    parser: argparse.ArgumentParser, flags: dict[str, tuple[Any, str]], config: Any
) -> None:
    """One ``--field-name`` option per entry of ``flags`` (field -> (type, help)), with the
    field's value in ``config`` (the defaults) as its default."""
    for name, (kind, text) in flags.items():
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=kind, default=getattr(config, name), help=text)


def validation_message(exc: pydantic.ValidationError, *, flags: bool = False) -> str:
    """One line naming every refused option -- as ``--flag-name`` when ``flags`` (the command
    line), else as the field name -- with what is allowed and the value given."""
    parts = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check across fields: its message names them and the values
            parts.append(msg)
            continue
        field = str(err["loc"][0])
        name = f"--{field.replace('_', '-')}" if flags else field
        parts.append(f"{name}: {msg} (got {err['input']!r})")
    return "; ".join(parts)
