"""Small MNIST training runs side by side, one per variant of a base config: per epoch the mean
forward solver iterations (``fwd_nstep``), the fraction of converged samples, the forward
residual (each step's batch mean of the relative residual; mean and max over the steps), the
mean step time (training steps only, evaluation excluded), the adaptive k (``grad_k``) when
logged, and the test accuracy. Used for the warm-start and adaptive-k measurements in EXPERIMENTS.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mnist_train_variants.py \\
        --config configs/ablation/mnist_upg.yaml --set data.root=../shared/data/mnist \\
        --variant fixed: --variant auto:grad.k=auto,grad.tol=0.05,grad.k_max=10 \\
        --out benchmarks/results/mnist_adaptive.json

``--set KEY=VALUE`` applies to every variant; ``--variant NAME:KEY=VALUE,...`` adds a run;
``--jobs N`` trains N variants at once (one fresh process and one thread each), so that variants
compared on step time run under the same machine load. The variant key ``cpu_memory=retain``
or ``cpu_memory=system`` (not a config key; needs ``--jobs`` >= 2) sets the process's CPU memory
policy (``phantomdeq.cpu_memory.retain_cpu_memory``, applied by the Trainer); without it a variant runs under glibc's defaults:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mnist_train_variants.py --jobs 2 \
        --config configs/ablation/mnist_upg.yaml --set data.root=../shared/data/mnist \
        --variant system:cpu_memory=system --variant retain:cpu_memory=retain \
        --out benchmarks/results/mnist_cpu_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from phantomdeq.cpu_memory import minor_page_faults
from phantomdeq.train import config_from_dict, run_training
from phantomdeq.train.metrics import read_metrics


def _apply(raw: dict[str, Any], assignments: list[str]) -> None:
    for item in assignments:
        key, _, value = item.partition("=")
        *path, last = key.strip().split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)


def _summary(run_dir: Path) -> dict[str, Any]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in recs if r["kind"] == "step" and r.get("stage") == "deq"]
    epochs = sorted({int(r["epoch"]) for r in steps})
    per_epoch = []
    for e in epochs:
        rs = [r for r in steps if int(r["epoch"]) == e]
        row = {
            "epoch": e,
            "steps": len(rs),
            "fwd_nstep": statistics.fmean(r["fwd_nstep"] for r in rs),
            "fwd_converged": statistics.fmean(r["fwd_converged"] for r in rs),
            "fwd_residual": statistics.fmean(r["fwd_residual"] for r in rs),
            "fwd_residual_max": max(r["fwd_residual"] for r in rs),
            "step_time_s": statistics.fmean(r["step_time_s"] for r in rs),
            "step_time_median_s": statistics.median(r["step_time_s"] for r in rs),
        }
        ks = [r["grad_k"] for r in rs if "grad_k" in r]
        if ks:
            row["grad_k_mean"] = statistics.fmean(ks)
            row["grad_k_min"], row["grad_k_max"] = min(ks), max(ks)
        per_epoch.append(row)
    ends = [r for r in recs if r["kind"] == "epoch"]
    return {
        "per_epoch": per_epoch,
        "test_acc": [r.get("test_acc") for r in ends],
        "train_loss": [r.get("train_loss") for r in ends],
    }


def _run_variant(base: dict[str, Any], spec: str) -> tuple[str, dict[str, Any]]:
    """Train one variant (``NAME:KEY=VALUE,...`` applied to ``base``) on one thread."""
    torch.set_num_threads(1)
    name, _, rest = spec.partition(":")
    raw = json.loads(json.dumps(base))
    items = [a for a in rest.split(",") if a]
    policy = "system"  # glibc's defaults unless the variant asks (the Trainer reads the variable)
    for item in [a for a in items if a.startswith("cpu_memory=")]:
        items.remove(item)
        policy = item.partition("=")[2]
        if policy not in ("retain", "system"):
            raise SystemExit(f"variant {name}: cpu_memory={policy!r}; allowed: retain, system")
    os.environ["PHANTOMDEQ_CPU_MEMORY"] = policy
    _apply(raw, items)
    faults0 = minor_page_faults()
    raw.setdefault("log", {}).update(progress=False, every=1, tensorboard=False, plot=False)
    cfg = config_from_dict(raw)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        final = run_training(cfg, Path(tmp) / name, progress=False)
        summary = _summary(Path(tmp) / name)
    summary["wall_s"] = time.perf_counter() - t0
    summary["minor_page_faults"] = minor_page_faults() - faults0
    summary["final"] = {k: final.get(k) for k in ("test_acc", "best_test_acc", "fwd_nstep")}
    summary["overrides"] = rest
    print(f"{name}: {json.dumps(summary['per_epoch'])} acc {summary['test_acc']}", flush=True)
    return name, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="variants trained at once, one process and one thread each (default 1: in turn)",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    _apply(base, args.sets)
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        # one fresh process per variant: a CPU memory policy is process-wide
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            done = list(pool.map(_run_variant, [base] * len(args.variant), args.variant))
    else:
        if any("cpu_memory=" in spec for spec in args.variant):
            ap.error("--variant ...cpu_memory=...: needs --jobs 2 or more (a process per variant)")
        done = [_run_variant(base, spec) for spec in args.variant]
    results = dict(done)
    out = {
        "config": args.config,
        "sets": args.sets,
        "results": results,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": 1,
        "jobs": args.jobs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(
        f"{'variant':10} {'epoch':>5} {'fwd it':>7} {'conv':>6} {'step s':>7} {'k':>5} {'acc':>7}"
    )
    for name, r in results.items():
        for row, acc in zip(r["per_epoch"], r["test_acc"] + [None] * len(r["per_epoch"])):
            k = row.get("grad_k_mean")
            print(
                f"{name:10} {row['epoch']:5d} {row['fwd_nstep']:7.2f} {row['fwd_converged']:6.3f} "
                f"{row['step_time_s']:7.3f} {'-' if k is None else format(k, '.2f'):>5} "
                f"{'-' if acc is None else format(acc, '.4f'):>7}"
            )


if __name__ == "__main__":
    main()
