"""``phantomdeq eval``: evaluate a checkpoint on its data set's test split.

    phantomdeq eval --checkpoint RUN_DIR/best.pt [--set key=value ...] [--device cpu]

The model, data set, solvers and compute precision (``train.precision``: precise BatchNorm
and the evaluation run under the same autocast as training) come from the config stored in
the checkpoint; ``--set``
changes them (e.g. ``--set eval_solver.max_iter=50`` or ``--set data.root=...``). Prints a JSON
object with the task's metrics (a classifier: loss and accuracy) and the forward-solver
statistics.

Exit status: 0 on success; 2 (one line on stderr) for a bad option, config or data and for a
checkpoint that cannot be evaluated -- missing, corrupted or changed since it was written (its
content hash), holding NaN/inf weights, or of another model than the config asks for (the
message names the differing config keys); 1 when the evaluation itself produces non-finite
values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phantomdeq.cli import HelpFormatter, user_error
from phantomdeq.data import DataError
from phantomdeq.errors import DEQError

from .checkpoint import CheckpointError, load_checkpoint
from .config import (
    ConfigError,
    add_set_argument,
    apply_overrides,
    config_from_dict,
    parse_overrides,
    resolve_data_root,
)
from .precision import check_precision

PROG = "phantomdeq eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a training checkpoint.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a last.pt / best.pt file")
    add_set_argument(p, "override a value of the stored config (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="evaluation batch size (default: data.eval_batch_size of the stored config)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .build import build_model, load_data, resolve_device
    from .distributed import DistInfo
    from .evaluation import evaluate, recalibrate_batchnorm
    from .model_state import check_finite_weights, load_model_weights
    from .tasks import build_task

    source = str(args.checkpoint)
    try:
        state = load_checkpoint(args.checkpoint)
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
        train_ds, test_ds, info = load_data(cfg)
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
        return user_error(PROG, str(exc), 2)
    except DEQError as exc:
        return user_error(
            PROG,
            f"evaluating {source!r} produced non-finite values ({exc}); try more "
            f"eval_solver.max_iter or another checkpoint",
            1,
        )
    report: dict[str, object] = {
        "checkpoint": source,
        "epoch": int(state["epoch"]),
        "step": int(state["step"]),
        **result,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
