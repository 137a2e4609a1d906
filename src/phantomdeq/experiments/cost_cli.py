"""``phantomdeq cost``: the command line of the cost experiment (:mod:`.cost`). The flags are
the fields of :class:`~.cost.CostConfig` (``--fwd-iters`` for ``fwd_iters`` ...), validated by
it; a refused value exits with status 2 naming the flag."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydantic
import torch

from phantomdeq.cli import HelpFormatter

from ._cli import add_flags, validation_message
from .cost import CostConfig, run
from .cost_report import format_table, machine, write_plot

__all__ = ["build_parser", "main"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


#: flag -> (type, help); defaults and allowed values come from CostConfig
_FLAGS: dict[str, tuple[Any, str]] = {
    "model": (str, "MDEQ configuration (mdeq_tiny, mdeq_cifar10m, ...)"),
    "batch": (int, "batch size"),
    "device": (str, "cpu or cuda"),
    "solver": (str, "forward solver"),
    "fwd_iters": (int, "forward solver budget (tol=0)"),
    "bwd_iters": (int, "IFT backward solver budget (tol=0)"),
    "ks": (_ints, "k values of UPG/NPG, e.g. 1,3,5,9"),
    "lam": (float, "damping λ of UPG/NPG, in (0, 1]"),
    "repeats": (int, "timed steps per method"),
    "warmup": (int, "untimed steps per method first"),
    "amp": (str, "none, or bf16: autocast f, stem and head"),
    "seed": (int, "seed of weights and data"),
    "methods": (
        _words,
        "comma-separated subset of methods (default: all), e.g. ift_broyden,upg_k5",
    ),
    "reference": (str, "method the ratios are taken against"),
    "modes": (
        _words,
        "comma list of execution modes timed side by side: eager, compile, graph (CUDA)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    d = CostConfig()
    p = argparse.ArgumentParser(
        prog="phantomdeq cost",
        description="Paper Table 2: time and peak memory of one training step per gradient estimator.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (cost.json, cost.png)")
    add_flags(p, _FLAGS, d)
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test setting: batch 2, 1 repeat, no warm-up, 2 forward / 2 backward iterations",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    opts: dict[str, Any] = {name: getattr(args, name) for name in _FLAGS}
    opts["memory"] = not args.no_memory
    if args.quick:
        opts.update(batch=2, repeats=1, warmup=0, fwd_iters=2, bwd_iters=2)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (allowed here: cpu)")
    try:
        cfg = CostConfig(**opts)
    except pydantic.ValidationError as exc:
        parser.error(validation_message(exc, flags=True))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    before = machine()
    print(
        f"phantomdeq cost: {cfg.model} batch {cfg.batch} {cfg.device} amp={cfg.amp}; load {before['loadavg']}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    records = run(cfg, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    payload = {
        "config": asdict(cfg),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "machine": before,
        "loadavg_after": machine()["loadavg"],
        "wall_s": wall,
        "records": records,
    }
    (out / "cost.json").write_text(json.dumps(payload, indent=2))
    print(format_table(records))
    try:
        write_plot(records, out / "cost.png")
        wrote = f"{out / 'cost.json'} and {out / 'cost.png'}"
    except ImportError:  # a bare GPU box may lack matplotlib (the `plots` extra)
        wrote = f"{out / 'cost.json'} (no cost.png: matplotlib is not installed)"
    print(f"wrote {wrote} ({wall:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
