"""The training configs shipped with the package (``phantomdeq/configs/*.yaml``), by name.

``--config`` of ``phantomdeq train`` / ``ablate`` takes a path to a YAML file or the name of a
preset: ``mdeq_tiny_digits``, ``ablation/mnist_upg`` ... (``.yaml`` may be left out);
``phantomdeq configs`` lists them. The same files are the repository's ``configs/`` folder.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from phantomdeq.cli import HelpFormatter, user_error

__all__ = [
    "PresetError",
    "main",
    "preset_description",
    "preset_names",
    "preset_path",
    "resolve_config",
]


class PresetError(ValueError):
    """``--config`` names neither an existing file nor a preset (the message lists them)."""


def _root() -> Path:
    return Path(str(resources.files("phantomdeq").joinpath("configs")))


def preset_names() -> list[str]:
    """Names of the shipped configs, e.g. ``mdeq_tiny_digits``, ``ablation/mnist_upg``."""
    root = _root()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of preset ``name`` (``.yaml`` optional). Raises :class:`PresetError` naming
    the presets when there is none of that name."""
    if not isinstance(name, str):
        raise TypeError(f"preset name must be a str, got {type(name).__name__}")
    key = name.removesuffix(".yaml").replace("\\", "/")
    if key in preset_names():
        return _root() / f"{key}.yaml"
    raise PresetError(
        f"config {name!r}: no such file and no preset of that name; presets: "
        f"{', '.join(preset_names())} (list them with `phantomdeq configs`)"
    )


def resolve_config(value: str | Path) -> Path:
    """``value`` as a config file: an existing file as given, else the preset of that name."""
    p = Path(value)
    if p.is_file():
        return p
    if p.is_dir():
        raise PresetError(f"config {str(value)!r}: is a directory, not a YAML file")
    return preset_path(str(value))


def preset_description(name: str) -> str:
    """The first comment line of a preset (its one-line description), without ``#``."""
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#"):
            return text.lstrip("#").strip()
        if text:
            break
    return ""


def main(argv: list[str] | None = None) -> int:
    """``phantomdeq configs [NAME]``: list the presets, or print one (to copy and edit)."""
    p = argparse.ArgumentParser(
        prog="phantomdeq configs",
        description="List the training configs shipped with phantomdeq (usable as "
        "`phantomdeq train --config NAME`), or print one of them.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("name", nargs="?", default=None, help="print this preset's YAML")
    args = p.parse_args(argv)
    if args.name is not None:
        try:
            sys.stdout.write(preset_path(args.name).read_text(encoding="utf-8"))
        except PresetError as exc:
            return user_error("phantomdeq configs", str(exc))
        return 0
    names = preset_names()
    width = max((len(n) for n in names), default=0)
    for name in names:
        text = preset_description(name)
        if len(text) > 76:
            text = text[:75].rstrip() + "…"
        print(f"{name:<{width}}  {text}")
    return 0
