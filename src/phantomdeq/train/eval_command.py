"""``phantomdeq eval``: evaluate a checkpoint on its data set's test split.

    phantomdeq eval --checkpoint RUN_DIR/best.pt [--set key=value ...] [--device cpu]

The model, data set and solvers come from the config stored in the checkpoint; ``--set``
changes them (e.g. ``--set eval_solver.max_iter=50`` or ``--set data.root=...``). Prints a JSON
object with the accuracy and the forward-solver statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint
from .config import (
    ConfigError,
    add_set_argument,
    apply_overrides,
    config_from_dict,
    parse_overrides,
    resolve_data_root,
)

PROG = "phantomdeq eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a training checkpoint.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a last.pt / best.pt file")
    add_set_argument(p, "override a value of the stored config (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .build import build_model, load_data, resolve_device
    from .evaluation import evaluate, recalibrate_batchnorm

    try:
        state = load_checkpoint(args.checkpoint)
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
        from .distributed import DistInfo

        device = resolve_device(cfg.train.device, DistInfo())
        train_ds, test_ds, info = load_data(cfg)
        get = (lambda k: info[k]) if isinstance(info, dict) else (lambda k: getattr(info, k))
        model = build_model(cfg, int(get("num_classes")), int(get("in_channels")))
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint {str(args.checkpoint)!r} does not match model {cfg.model.name!r}: {exc}"
            ) from exc
        model.to(device, getattr(torch, cfg.train.dtype))
        # precise BatchNorm as in training (train.bn_recalibration_batches; --set to change it)
        recalibrate_batchnorm(
            model,
            train_ds,
            batches=cfg.train.bn_recalibration_batches,
            batch_size=cfg.data.batch_size,
            device=device,
        )
        with torch.no_grad():
            result = evaluate(model, test_ds, batch_size=cfg.data.eval_batch_size, device=device)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    report: dict[str, object] = {
        "checkpoint": str(args.checkpoint),
        "epoch": int(state["epoch"]),
        "step": int(state["step"]),
        **result,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
