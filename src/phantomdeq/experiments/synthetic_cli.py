"""``phantomdeq synthetic``: the command line of the synthetic experiment (:mod:`.synthetic`).

The flags are the fields of :class:`~.synthetic.SyntheticConfig` (``--input-dim`` for
``input_dim`` ...); the config validates them, and a refused value is one line on stderr naming
the flag, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic

from phantomdeq.cli import HelpFormatter

from ._cli import add_flags, validation_message
from .synthetic import SyntheticConfig, run
from .synthetic_report import format_table, write_error_figure, write_figure

__all__ = ["build_parser", "main"]

PROG = "phantomdeq synthetic"


def _ints(text: str) -> tuple[int, ...]:
    """``"1-10"``, ``"1,2,5"`` or a mix like ``"1-3,8"``."""
    out: list[int] = []
    for part in text.split(","):
        rng = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        try:
            out.extend(range(int(rng[1]), int(rng[2]) + 1) if rng else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected integers like '1-10' or '1,2,5', got {text!r}"
            ) from None
    return tuple(out)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like '0.5,1', got {text!r}") from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in text.split(","))


#: flag -> (type, help); the defaults and the allowed values come from SyntheticConfig
_FLAGS: dict[str, tuple[Any, str]] = {
    "draws": (int, "independent draws (problem, input, target)"),
    "hidden": (int, "dimension of h"),
    "input_dim": (int, "dimension of x"),
    "lipschitz": (float, "L_h of F in h, in (0, 1)"),
    "activation": (str, "the activation σ: tanh, sigmoid or relu"),
    "ks": (_ints, "unrolling/Neumann steps, e.g. 1-10 or 1,2,5"),
    "lams": (_floats, "damping λ values in (0, 1], comma-separated"),
    "methods": (_words, "comma-separated subset of upg,npg"),
    "tol": (float, "rel. residual defining the exact h*"),
    "max_iter": (int, "fixed-point updates at most"),
    "inexact_tol": (float, "rel. residual at which the inexact h~ is stopped"),
    "broyden_iter": (int, "Broyden iterations of the IFT check"),
    "seed": (int, "seed of the draws"),
}


def build_parser() -> argparse.ArgumentParser:
    defaults = SyntheticConfig()
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Paper Fig. 1: cosine similarity of the unrolled (UPG) and Neumann (NPG) phantom "
            "gradients to the exact gradient on F(h, x) = act(W h + U x + b) with Lipschitz "
            "constant L_h in h, plus the Theorem 1 descent-condition check."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    add_flags(p, _FLAGS, defaults)
    p.add_argument("--no-inexact", action="store_true", help="skip the inexact-solution variant")
    p.add_argument("--no-theorem", action="store_true", help="skip the Theorem 1 matrix check")
    p.add_argument(
        "--fig",
        type=Path,
        default=None,
        help="where to write the figure (default OUT/fig1.png; the log-scale companion goes "
        "next to it with the suffix _error)",
    )
    p.add_argument("--no-figure", action="store_true", help="do not write the figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``phantomdeq synthetic``: returns 0 on success, 2 for invalid options."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse already printed the message naming the option
        return int(exc.code) if isinstance(exc.code, int) else 2
    options = {name: getattr(args, name) for name in _FLAGS}
    if args.no_inexact:
        options["inexact_tol"] = None
    try:
        cfg = SyntheticConfig(**options, theorem=not args.no_theorem)
    except pydantic.ValidationError as exc:
        print(f"{PROG}: error: {validation_message(exc, flags=True)}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    result = run(cfg, progress=not args.no_progress)
    (out / "results.json").write_text(json.dumps(result.records, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(result.summary, indent=1) + "\n")
    written = [out / "results.json", out / "summary.json"]
    if not args.no_figure:
        fig: Path = args.fig if args.fig is not None else out / "fig1.png"
        written.append(write_figure(result, fig))
        written.append(write_error_figure(result, fig.with_name(f"{fig.stem}_error{fig.suffix}")))
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
