"""The one convention of the experiment commands (``phantomdeq synthetic``, ``cost``, ``ablate``
and ``demo``).

Every command module has ``build_parser() -> Parser`` and ``main(argv) -> int``, and ``main`` is
``return run_command(build_parser(), body, argv)`` with ``body(args) -> int`` the command itself:

* **arguments**: a :class:`Parser` (argparse with the ``phantomdeq`` help formatter). Options
  that are fields of a config dataclass come from :func:`add_flags` (``--field-name``, the
  field's default) and are validated by the dataclass through :func:`config_from_flags`;
* **user errors**: anything wrong with what the user asked for -- argparse's own refusals, a
  refused config field, an impossible combination -- raises :class:`UsageError`;
  :func:`run_command` prints it as one line ``PROG: error: message`` on stderr and returns 2
  (no usage block). ``--help`` prints the help and returns 0;
* **outputs**: files go to the ``--out`` folder through :class:`Outputs` (created on first use;
  JSON written whole or not at all), which prints the written paths as one ``wrote ...`` line
  on stdout at the end (:meth:`Outputs.report`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from phantomdeq.cli import HelpFormatter, user_error

__all__ = [
    "Outputs",
    "Parser",
    "UsageError",
    "add_flags",
    "config_from_flags",
    "float_list",
    "int_list",
    "run_command",
    "validation_message",
    "word_list",
]

T = TypeVar("T")


class UsageError(ValueError):
    """A user error of an experiment command: one line naming the option and what is allowed;
    the command exits with status 2."""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the ``phantomdeq`` help formatter whose refusals raise
    :class:`UsageError` (one line, exit status 2 through :func:`run_command`) instead of
    printing the usage block and exiting."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description, formatter_class=HelpFormatter)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def run_command(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run ``body(args)``; a :class:`UsageError`
    raised by either is one line on stderr and exit status 2. Returns the exit status."""
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        return int(body(args) or 0)
    except UsageError as exc:
        return user_error(parser.prog, str(exc))
    except SystemExit as exc:  # --help (and --version) print and exit with status 0
        return exc.code if isinstance(exc.code, int) else 0


def add_flags(
    parser: argparse.ArgumentParser, flags: dict[str, tuple[Any, str]], config: Any
) -> None:
    """One ``--field-name`` option per entry of ``flags`` (field -> (type, help)), with the
    field's value in ``config`` (the defaults) as its default."""
    for name, (kind, text) in flags.items():
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=kind, default=getattr(config, name), help=text)


def validation_message(exc: Any, *, flags: bool = False) -> str:
    """One line naming every refused option of a ``pydantic.ValidationError`` -- as
    ``--flag-name`` when ``flags`` (the command line), else as the field name -- with what is
    allowed and the value given."""
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


def config_from_flags(cls: Callable[..., T], **options: Any) -> T:
    """``cls(**options)``, a pydantic config dataclass; a refused value raises
    :class:`UsageError` naming the flag (:func:`validation_message`)."""
    import pydantic

    try:
        return cls(**options)
    except pydantic.ValidationError as exc:
        raise UsageError(validation_message(exc, flags=True)) from None


# --------------------------------------------------------------------------- option types


def int_list(text: str) -> tuple[int, ...]:
    """``"1-10"``, ``"1,2,5"`` or a mix like ``"1-3,8"`` (empty parts are skipped)."""
    out: list[int] = []
    for part in text.split(","):
        if not part.strip():
            continue
        rng = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        try:
            out.extend(range(int(rng[1]), int(rng[2]) + 1) if rng else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected integers like '1-10' or '1,2,5', got {text!r}"
            ) from None
    return tuple(out)


def float_list(text: str) -> tuple[float, ...]:
    """``"0.5,1"``."""
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like '0.5,1', got {text!r}") from None


def word_list(text: str) -> tuple[str, ...]:
    """``"upg, npg"`` -> ``("upg", "npg")`` (empty parts are skipped)."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


# --------------------------------------------------------------------------- outputs


class Outputs:
    """The files a command writes into its output folder ``out`` (created on first use).
    Each writer returns the path; :meth:`report` prints them as one ``wrote ...`` line."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.written: list[Path] = []
        self.notes: list[str] = []

    def path(self, name: str | Path) -> Path:
        """``out / name`` for a ``str`` name; a ``Path`` (e.g. a ``--fig`` option) as given.
        Its folder is created."""
        p = self.out / name if isinstance(name, str) else name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def json(self, name: str | Path, payload: Any, *, indent: int = 2) -> Path:
        """``payload`` as JSON (values JSON cannot hold as their ``str``), written to a
        temporary file first and renamed: a reader never sees half a file."""
        p = self.path(name)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=indent, default=str) + "\n")
        os.replace(tmp, p)
        return self.add(p)

    def text(self, name: str | Path, text: str) -> Path:
        p = self.path(name)
        p.write_text(text)
        return self.add(p)

    def figure(self, name: str | Path, draw: Callable[[Path], object]) -> Path | None:
        """``draw(path)`` writes a figure; without matplotlib (the ``plots`` extra) it is left
        out with a note in :meth:`report`."""
        p = self.path(name)
        try:
            draw(p)
        except ImportError:
            self.notes.append(f"no {p.name}: matplotlib is not installed")
            return None
        return self.add(p)

    def add(self, p: Path) -> Path:
        """Count ``p`` among the written files (a file written by other code)."""
        if p not in self.written:
            self.written.append(p)
        return p

    def report(self, extra: str = "") -> None:
        """Print ``wrote A, B[ (notes)][ extra]`` on stdout."""
        line = "wrote " + ", ".join(str(p) for p in self.written)
        if self.notes:
            line += f" ({'; '.join(self.notes)})"
        print(line + (f" {extra}" if extra else ""))
