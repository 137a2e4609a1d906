"""``phantomdeq train``: train a model from a YAML config.

    phantomdeq train --config configs/mdeq_tiny_digits.yaml [--out RUN_DIR]
                     [--set key=value ...] [--resume | --overwrite] [--no-progress]

A run folder that already holds a run is refused unless ``--resume`` (continue it from
``last.pt``; without it from ``best.pt``, which holds the same complete state of its epoch,
with a notice; with no checkpoint yet the run starts from the beginning, unless
``metrics.jsonl`` records more than the first epoch or the config differs from the folder's
``config.yaml``: then the resume is refused and nothing changes) or
``--overwrite`` (delete the old run's files and start afresh). ``--resume --set
train.epochs=N`` with a larger N extends a finished run.

Multi-process: ``torchrun --nproc_per_node=N -m phantomdeq train --config ...``.
Exit status: 0 on success; 2 for a bad command line, config, run folder or data (a
:class:`phantomdeq.data.DataError`, also one met while training), and for a file the
environment does not let the run write (disk full, a file-size limit, a read-only folder, no
permission: :class:`~phantomdeq.train.atomic.OutputWriteError`; the files already written are
intact and the message says how to go on), one line on stderr; 1 when
training fails (divergence, unreadable checkpoint or metrics file); 130 on SIGINT and 143 on
SIGTERM (the run stops after the current step, writes ``last.pt`` there and
prints the command that continues it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from phantomdeq.cli import HelpFormatter, user_error
from phantomdeq.data import DataError

from .atomic import OutputWriteError
from .checkpoint import CheckpointError
from .config import ConfigError, add_set_argument, load_config
from .distributed import DistributedError
from .metrics_log import MetricsFileError
from .run_dir import check_run_folder

PROG = "phantomdeq train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a DEQ model from a YAML config or a shipped preset.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        help="YAML config file or preset name (e.g. mdeq_tiny_digits; `phantomdeq configs` lists "
        "them); optional with --resume",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="run directory (default: runs/<config name>); holds config.yaml, metrics.jsonl, "
        "last.pt, best.pt, curves.png, tensorboard/",
    )
    add_set_argument(
        p, "override a config value, e.g. --set optim.lr=0.05 --set grad.name=ift (repeatable)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from last.pt (exactly where it stopped)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in --out (its config.yaml, metrics.jsonl, last.pt, "
        "best.pt, curves.png, tensorboard/) and start afresh",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar / epoch lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .trainer import TrainingError, TrainingInterrupted, run_training

    if args.config is None:
        if not args.resume or args.out is None:
            return user_error(PROG, "--config is required (or --resume with --out RUN_DIR)", 2)
        args.config = args.out / "config.yaml"
    out = args.out if args.out is not None else Path("runs") / args.config.stem
    again = f"{PROG} --out {out} --resume"
    try:
        if int(os.environ.get("RANK", "0")) == 0:  # other ranks: the trainer shares the verdict
            check_run_folder(out, resume=args.resume, overwrite=args.overwrite)
        cfg = load_config(args.config, args.overrides)
        if args.no_progress:
            cfg.log.progress = False
        result = run_training(
            cfg,
            out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except OutputWriteError as exc:
        if (out / "last.pt").is_file() or (out / "best.pt").is_file():
            then = f"then continue with: {again}"
        else:
            then = "then start the run again (no checkpoint was written)"
        return user_error(PROG, f"{exc}; {then}", 2)
    except (ConfigError, DataError) as exc:
        return user_error(PROG, str(exc), 2)
    except (CheckpointError, TrainingError, MetricsFileError, DistributedError) as exc:
        return user_error(PROG, str(exc), 1)
    except TrainingInterrupted as exc:
        return user_error(
            PROG, f"interrupted by {exc.signal_name}: {exc}; continue with: {again}", exc.exit_code
        )
    except KeyboardInterrupt:
        return user_error(PROG, f"interrupted; continue with: {again}", 130)
    if int(os.environ.get("RANK", "0")) == 0:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in result.items()
        }
        print(json.dumps(clean, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
