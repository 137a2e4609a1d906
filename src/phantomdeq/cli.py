"""The ``phantomdeq`` command.

Each sub-command is a function ``main(argv: list[str]) -> int`` of its module (or the one named
after ``module:``), which owns its argument parser; this file only dispatches, importing the
module lazily so that ``phantomdeq --help`` stays fast and heavy optional dependencies load only when needed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from phantomdeq._extras import OPTIONAL_MODULES, missing_message, missing_modules, top_module
from phantomdeq.cpu_memory import cpu_memory_from_env, retain_cpu_memory

#: command name -> (module path, or ``module:function`` when not ``main``; one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("phantomdeq.experiments.demo", "run the demonstration that `make demo` runs"),
    "synthetic": (
        "phantomdeq.experiments.synthetic",
        "paper Fig. 1: phantom vs exact gradient cosine",
    ),
    "train": ("phantomdeq.train.commands", "train a model from a YAML config"),
    "eval": ("phantomdeq.train.commands:eval_main", "evaluate a checkpoint"),
    "sample": ("phantomdeq.train.sample", "write text with a trained language model"),
    "cost": ("phantomdeq.experiments.cost", "paper Table 2: time and memory of each gradient"),
    "ablate": ("phantomdeq.experiments.ablation", "paper Table 1 / Fig. 3: grid of training runs"),
    "configs": ("phantomdeq.presets", "list the shipped training configs (presets for --config)"),
}

#: command name -> optional modules it cannot run without (checked before it starts, so a
#: missing one is one line naming the extra to install, not a traceback minutes later)
REQUIRES: dict[str, tuple[str, ...]] = {
    "demo": ("pydantic", "yaml", "sklearn"),
    "synthetic": ("pydantic",),
    "train": ("pydantic", "yaml"),
    "eval": ("pydantic", "yaml"),
    "sample": ("pydantic", "yaml"),
    "cost": ("pydantic",),
    "ablate": ("pydantic", "yaml"),
    "configs": (),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default (``(default: 0.5)``), except for flags and options
    whose default is "not given" (``None``, ``False``, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        default = action.default
        if text is None or "%(default)" in text or default in (None, False, [], argparse.SUPPRESS):
            return text
        if isinstance(default, list | tuple):  # as typed on the command line: 1,2,5
            default = ",".join(str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


def user_error(prog: str, message: str, code: int = 2) -> int:
    """Print a user error as one line on stderr (``prog: error: message``, whitespace folded)
    and return ``code``, the command's exit status (2 for a user error)."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _usage() -> str:
    lines = ["usage: phantomdeq COMMAND [options]", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines.append("")
    lines.append("Run `phantomdeq COMMAND --help` for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"phantomdeq: unknown command {name!r}; allowed: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    prog = f"phantomdeq {name}"
    missing = missing_modules(REQUIRES.get(name, ()))
    if missing:
        return user_error(prog, missing_message(missing, "this command"))
    try:
        # freed CPU memory stays in the process: no page fault per reused MiB (cpu_memory.py)
        if cpu_memory_from_env() == "retain":
            retain_cpu_memory()
    except ValueError as exc:
        return user_error(prog, str(exc))
    try:
        module_name, _, function = COMMANDS[name][0].partition(":")
        module = importlib.import_module(module_name)
        return int(getattr(module, function or "main")(rest) or 0)
    except ModuleNotFoundError as exc:
        # an optional dependency a particular option needs (e.g. Pillow for image folders)
        if top_module(exc) not in OPTIONAL_MODULES:
            raise
        return user_error(prog, missing_message([str(top_module(exc))], "this command"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
