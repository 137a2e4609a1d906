"""Python part of benchmarks/gpu_check.sh: generated CIFAR-shaped data in the real on-disk
format, and training runs of the real trainer timed per precision.

    python benchmarks/gpu_check.py make-cifar DIR [--train-per-batch N] [--test N]
    python benchmarks/gpu_check.py steps --config configs/mdeq_cifar10m.yaml --data DIR \\
        --precisions fp32,bf16 --steps 12 --batch 128 --device cuda --out steps.json
    python benchmarks/gpu_check.py run --config CFG --out-dir RUN --json result.json \\
        [--set key=value ...]

``steps`` trains ``--steps`` optimiser steps per precision with the trainer itself (stem, DEQ
solve, phantom gradient, head, loss, backward, optimiser, GradScaler for fp16) and reports the
median of the per-step wall times the trainer logs (``step_time_s``: CUDA-synchronised, the
first two steps -- cuDNN autotuning, allocator warm-up -- left out) and the ratio to fp32.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phantomdeq.train import load_config, run_training
from phantomdeq.train.metrics_log import read_metrics

CIFAR_DIR = "cifar-10-batches-py"


def make_cifar(root: Path, *, train_per_batch: int, test: int, seed: int = 0) -> Path:
    """Write ``data_batch_1..5`` and ``test_batch`` like the real CIFAR-10 python release:
    pickled dicts with ``b"data"`` (uint8 [N, 3072], channel-major 32x32) and ``b"labels"``.
    Each class is a fixed random colour pattern plus noise, so a model can learn it."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(40, 216, size=(10, 3072)).astype(np.float32)
    out = root / CIFAR_DIR
    out.mkdir(parents=True, exist_ok=True)

    def batch(n: int, name: str) -> None:
        labels = rng.integers(0, 10, size=n)
        noise = rng.normal(0.0, 48.0, size=(n, 3072))
        data = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        payload = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(out / name, "wb") as fh:
            pickle.dump(payload, fh, protocol=3)  # bytes as BINBYTES (no _codecs global)

    for i in range(1, 6):
        batch(train_per_batch, f"data_batch_{i}")
    batch(test, "test_batch")
    return out


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    return info


def time_steps(args: argparse.Namespace) -> dict[str, Any]:
    records = []
    base = [
        *([f"data.root={args.data}"] if args.data is not None else []),
        f"data.batch_size={args.batch}",
        f"data.train_size={args.batch * args.steps}",
        f"data.test_size={args.batch}",
        "train.epochs=1",
        "train.bn_recalibration_batches=1",
        f"train.device={args.device}",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        "log.every=1",
        *args.set,
    ]
    for precision in args.precisions.split(","):
        run_dir = Path(args.work) / f"steps_{precision}"
        cfg = load_config(args.config, [*base, f"train.precision={precision}"])
        t0 = time.perf_counter()
        result = run_training(cfg, run_dir, progress=False)
        wall = time.perf_counter() - t0
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]
        times = [float(r["step_time_s"]) for r in rows][2:]
        rec = {
            "precision": precision,
            "steps": len(rows),
            "median_step_s": statistics.median(times) if times else float("nan"),
            "min_step_s": min(times) if times else float("nan"),
            "train_loss_first_last": [rows[0]["train_loss"], rows[-1]["train_loss"]],
            "fwd_nstep_mean": statistics.fmean(float(r["fwd_nstep"]) for r in rows),
            "scaler_skipped": sum(int(r.get("scaler_skipped", 0)) for r in rows),
            "run_wall_s": wall,
            "test_acc": result["test_acc"],
        }
        records.append(rec)
        print(json.dumps(rec), flush=True)
    ref = next((r for r in records if r["precision"] == "fp32"), None)
    if ref is not None:
        for r in records:
            r["speedup_vs_fp32"] = ref["median_step_s"] / r["median_step_s"]
    print(f"{'precision':>9}  {'median step s':>13}  {'speed-up vs fp32':>16}  skipped")
    for r in records:
        print(
            f"{r['precision']:>9}  {r['median_step_s']:>13.4f}  "
            f"{r.get('speedup_vs_fp32', float('nan')):>16.2f}  {r['scaler_skipped']:>7}"
        )
    return {
        "config": str(args.config),
        "batch": args.batch,
        "machine": _machine(args.device),
        "records": records,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.set)
    t0 = time.perf_counter()
    result = run_training(cfg, args.out_dir, progress=False)
    result["wall_s"] = time.perf_counter() - t0
    result["overrides"] = args.set
    result["machine"] = _machine(cfg.train.device)
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-cifar", help="write CIFAR-shaped pickled batches")
    m.add_argument("root", type=Path)
    m.add_argument("--train-per-batch", type=int, default=2000)
    m.add_argument("--test", type=int, default=2000)
    s = sub.add_parser("steps", help="time training steps per precision")
    s.add_argument("--config", type=Path, required=True)
    s.add_argument("--data", type=Path, help="data.root (e.g. make-cifar's DIR)")
    s.add_argument("--precisions", default="fp32,bf16")
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--device", default="cuda")
    s.add_argument("--work", type=Path, default=Path("gpu_check_runs"))
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--set", action="append", default=[])
    r = sub.add_parser("run", help="one training run; its result as JSON")
    r.add_argument("--config", type=Path, required=True)
    r.add_argument("--out-dir", type=Path, required=True)
    r.add_argument("--json", type=Path, required=True)
    r.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    if args.cmd == "make-cifar":
        if args.train_per_batch < 1 or args.test < 1:
            p.error("--train-per-batch and --test must be >= 1")
        print(make_cifar(args.root, train_per_batch=args.train_per_batch, test=args.test))
        return 0
    if args.cmd == "steps":
        if args.steps < 3 or args.batch < 1:
            p.error("--steps must be >= 3 and --batch >= 1")
        payload = time_steps(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
        return 0
    payload = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
