"""``phantomdeq train``: train a model from a YAML config.

    phantomdeq train --config configs/mdeq_tiny_digits.yaml [--out RUN_DIR]
                     [--set key=value ...] [--resume] [--no-progress]

Multi-process: ``torchrun --nproc_per_node=N -m phantomdeq train --config ...``.
Exit status: 0 on success, 2 for a bad command line or config, 1 when training fails
(non-finite loss, unreadable checkpoint), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, add_set_argument, load_config
from .distributed import DistributedError

PROG = "phantomdeq train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a DEQ model from a YAML config (see configs/).",
    )
    p.add_argument("--config", type=Path, help="YAML config file (optional with --resume)")
    p.add_argument(
        "--out",
        type=Path,
        help="run directory (default: runs/<config name>); holds config.yaml, metrics.jsonl, "
        "last.pt, best.pt, curves.png, tensorboard/",
    )
    add_set_argument(
        p, "override a config value, e.g. --set optim.lr=0.05 --set grad.name=ift (repeatable)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / epoch lines")
    return p


def _error(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .trainer import TrainingError, run_training

    if args.config is None:
        if not args.resume or args.out is None:
            return _error("--config is required (or --resume with --out RUN_DIR)", 2)
        args.config = args.out / "config.yaml"
    out = args.out if args.out is not None else Path("runs") / args.config.stem
    try:
        cfg = load_config(args.config, args.overrides)
        if args.no_progress:
            cfg.log.progress = False
        result = run_training(cfg, out, resume=args.resume, progress=not args.no_progress)
    except ConfigError as exc:
        return _error(str(exc), 2)
    except (CheckpointError, TrainingError, DistributedError) as exc:
        return _error(str(exc), 1)
    except KeyboardInterrupt:
        return _error(f"interrupted; continue with: {PROG} --out {out} --resume", 130)
    if int(os.environ.get("RANK", "0")) == 0:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in result.items()
        }
        print(json.dumps(clean, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
