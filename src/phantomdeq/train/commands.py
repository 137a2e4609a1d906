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
permission: :class:`~phantomdeq.train.run_folder.OutputWriteError`; the files already written are
intact and the message says how to go on), one line on stderr; 1 when
training fails (divergence, unreadable checkpoint or metrics file); 130 on SIGINT and 143 on
SIGTERM (the run stops after the current step, writes ``last.pt`` there and
prints the command that continues it).

``phantomdeq eval``: evaluate a checkpoint on its data set's test split.

    phantomdeq eval RUN_DIR [--set key=value ...] [--device cpu]
    phantomdeq eval --checkpoint RUN_DIR/best.pt [...]

A run folder stands for its ``best.pt``, or its ``last.pt`` when there is no ``best.pt``.

The model, data set, solvers and compute precision (``train.precision``: precise BatchNorm
and the evaluation run under the same autocast as training) come from the config stored in
the checkpoint; ``--set``
changes them (e.g. ``--set eval_solver.max_iter=50`` or ``--set data.root=...``). Prints a JSON
object with the task's metrics (a classifier: loss and accuracy) and the forward-solver
statistics, and under ``"meaning"`` what each of them is in words (``test_fwd_converged``: the
share of test samples whose forward solve reached the eval solver's tolerance, which it names).

Exit status: 0 on success; 2 (one line on stderr) for a bad option, config or data and for a
checkpoint that cannot be evaluated -- missing, corrupted or changed since it was written (its
content hash), holding NaN/inf weights, or of another model than the config asks for (the
message names the differing config keys); 1 when the evaluation itself produces non-finite
values.
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
from phantomdeq.errors import DEQError

from .config import (
    ConfigError,
    add_set_argument,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_overrides,
    resolve_data_root,
)
from .distributed import DistributedError
from .metrics import MetricsFileError
from .precision import check_precision
from .run_folder import CheckpointError, OutputWriteError, check_run_folder, load_checkpoint

__all__ = ["build_eval_parser", "build_parser", "eval_main", "main"]


# --- phantomdeq train -------------------------------------------------------------------------

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


# --- phantomdeq eval --------------------------------------------------------------------------

EVAL_PROG = "phantomdeq eval"
#: what a run folder given instead of a checkpoint stands for, in order of preference
RUN_CHECKPOINTS = ("best.pt", "last.pt")


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself, or for a run folder its ``best.pt`` (else its ``last.pt``)."""
    if not path.is_dir():
        return path
    for name in RUN_CHECKPOINTS:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{str(path)!r} is a folder without best.pt or last.pt: give the folder of a run "
        "(phantomdeq train --out / phantomdeq demo --out) or a checkpoint file"
    )


def explain(result: dict[str, float], solver: object) -> dict[str, str]:
    """Each metric of :func:`~phantomdeq.train.data.evaluate` in words; ``solver`` is the
    evaluation's forward-solver config (its ``name``, ``max_iter``, ``tol``, ``stop``)."""
    name = getattr(solver, "name", "?")
    max_iter = getattr(solver, "max_iter", "?")
    tol = getattr(solver, "tol", "?")
    stop = getattr(solver, "stop", "rel")
    residual = "||F(z) - z|| / ||z||" if stop == "rel" else "||F(z) - z||"
    n = int(result.get("test_n", 0))
    converged = result.get("test_fwd_converged", float("nan"))
    return {
        "test_acc": f"fraction of the {n} test units predicted correctly (images classified, "
        "or next characters of a language model)",
        "test_loss": "mean cross-entropy loss (nats) over the test units (images, or tokens)",
        "test_bpc": "bits per character: the language model's test loss / ln 2",
        "test_fwd_nstep": (
            f"mean forward-solver iterations per sample (eval solver {name}, at most {max_iter})"
        ),
        "test_fwd_residual": "mean relative residual ||F(z) - z|| / ||z|| of the returned states",
        "test_fwd_converged": (
            f"fraction of test samples whose forward solve converged: {residual} <= {tol} "
            f"(the eval solver's tol, stop={stop!r}) within {max_iter} iterations; here "
            f"{100 * converged:.1f} %. The others are scored at their best iterate (raise "
            "eval_solver.max_iter with --set to solve further)"
        ),
        "test_n": "number of test units (images, or tokens)",
        "epoch": "epochs completed when the checkpoint was written",
        "step": "optimiser steps taken when the checkpoint was written",
    }


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=EVAL_PROG,
        description="Evaluate a training checkpoint.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "run",
        nargs="?",
        type=Path,
        default=None,
        metavar="RUN",
        help="a run folder (its best.pt, else its last.pt) or a checkpoint file",
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="a last.pt / best.pt file (or a run folder)"
    )
    add_set_argument(p, "override a value of the stored config (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="evaluation batch size (default: data.eval_batch_size of the stored config)",
    )
    return p


def eval_main(argv: list[str] | None = None) -> int:
    args = build_eval_parser().parse_args(argv)
    import torch

    from .build import build_model, resolve_device
    from .data import evaluate, load_data, recalibrate_batchnorm
    from .distributed import DistInfo
    from .run_folder import check_finite_weights, load_model_weights
    from .tasks import build_task

    if (args.run is None) == (args.checkpoint is None):
        return user_error(
            EVAL_PROG,
            "give one run folder or checkpoint: phantomdeq eval RUN_DIR, or "
            f"phantomdeq eval --checkpoint RUN_DIR/best.pt (got {'both' if args.run else 'none'})",
            2,
        )
    try:
        path = resolve_checkpoint(args.run if args.run is not None else args.checkpoint)
    except CheckpointError as exc:
        return user_error(EVAL_PROG, str(exc), 2)
    source = str(path)
    try:
        state = load_checkpoint(
            path, on_unverified=lambda m: print(f"phantomdeq: {m}", file=sys.stderr)
        )
        stored = config_from_dict(state["config"])
        raw = apply_overrides(state["config"], parse_overrides(args.overrides))
        if args.device != "auto":
            raw = apply_overrides(raw, [("train.device", args.device)])
        cfg = config_from_dict(raw)
        if cfg.data.root is not None:
            cfg.data.root = str(resolve_data_root(cfg.data.root))
        if args.batch_size is not None:
            if args.batch_size < 1:
                raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
            cfg.data.eval_batch_size = args.batch_size
        device = resolve_device(cfg.train.device, DistInfo())
        problem = check_precision(cfg.train.precision, cfg.train.dtype, device.type)
        if problem is not None:
            raise ConfigError(problem)
        train_ds, test_ds, info = load_data(cfg, vocab=state.get("vocab"))
        task = build_task(cfg, info)
        model = build_model(cfg, info=info)
        load_model_weights(model, state["model"], source=source, stored=stored, requested=cfg)
        check_finite_weights(model, source=source)
        model.to(device, getattr(torch, cfg.train.dtype))
        # precise BatchNorm as in training (train.bn_recalibration_batches; --set to change it)
        recalibrate_batchnorm(
            model,
            train_ds,
            batches=cfg.train.bn_recalibration_batches,
            batch_size=cfg.data.batch_size,
            device=device,
            precision=cfg.train.precision,
        )
        with torch.no_grad():
            result = evaluate(
                model,
                test_ds,
                batch_size=cfg.data.eval_batch_size,
                device=device,
                precision=cfg.train.precision,
                task=task,
            )
    except (ConfigError, CheckpointError, DataError) as exc:
        return user_error(EVAL_PROG, str(exc), 2)
    except DEQError as exc:
        return user_error(
            EVAL_PROG,
            f"evaluating {source!r} produced non-finite values ({exc}); try more "
            f"eval_solver.max_iter or another checkpoint",
            1,
        )
    report: dict[str, object] = {
        "checkpoint": source,
        "epoch": int(state["epoch"]),
        "step": int(state["step"]),
        **result,
        "meaning": explain(result, cfg.eval_solver or cfg.solver),
    }
    print(json.dumps(report, indent=2))
    return 0
