"""The one GPU script: every GPU-only measurement in one command, written to one JSON.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--parts cuda_tests,...]
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json   # CPU, tiny, seconds

Parts, in this order (each one a fresh process with its own time limit; a part that fails or
runs out of time is recorded as such and the others still run; the limits add up to 11 min
10 s):

* ``cuda_tests``: ``tests/test_cuda.py`` (CPU/CUDA agreement, host syncs, CUDA-graph replay)
  and ``tests/test_deq_autocast.py`` (every solver and estimator under a CUDA fp16/bf16 autocast);
* ``solver_overhead``: ``benchmarks/solver_overhead.py`` on the MDEQ-Tiny cell (``mdeq``),
  batch 64, eager and CUDA graph, TorchDEQ's solvers beside: solve / bare f, goal ``<= 1.3``;
* ``precision``: ``phantomdeq cost`` on MDEQ-CIFAR-10M, batch 64, UPG(5, 0.5) and IFT
  (Broyden x20) steps in fp32 and in bf16 autocast, eager and CUDA graph: bf16 / fp32 step
  time, goal ``<= 0.67``;
* ``tiny_epoch``: one MDEQ-Tiny epoch (``configs/mdeq_tiny_cifar10.yaml``, the trainer itself)
  on 50,000 generated CIFAR-shaped images written in the real on-disk format: the training
  epoch's time (evaluation excluded), goal ``<= 12 s``;
* ``vs_torchdeq``: ``benchmarks/vs_torchdeq.py``, MDEQ-Tiny batch 64, eager and CUDA graph:
  phantomdeq / TorchDEQ step time, goal ``<= 0.6``;
* ``digits_bf16``: the digits recipe (``configs/mdeq_tiny_digits.yaml``), 2 epochs in fp32 and in
  bf16: test accuracies within 2 points (the criterion the CPU suite checks on a subset,
  ``tests/test_precision.py``);
* ``lm_tokens``: training tokens per second of the DEQ language model's GPU preset
  (``configs/deq_lm_shakespeare_gpu.yaml``: width 384, context 256, UPG(5, 0.5), the trainer
  itself) at its batch of 64, in fp32 and in bf16 autocast (the preset's precision): the median
  of the trainer's per-step ``tokens_per_s``, and bf16 / fp32 step time (no goal). Another
  ``deq_lm*`` preset stands in when the GPU one is absent; skipped, with the reason, when none
  ships.

The JSON holds the machine, and per part its command, exit status, wall time, the headline
numbers against their goals, the part's own full JSON and the tail of its output. Exit status
0 when every part that ran succeeded. ``--dry-run`` runs the same parts on the CPU at tiny sizes
(no CUDA graphs; goals not judged; the CUDA tests only collected, their CPU cases run in the test
suite; time limits tripled): what the tests run, so that this script cannot rot. It took 142 s
on the shared 2-core development machine at load average 7.

Helpers, also usable alone (they produced ``benchmarks/results/precision_steps_digits_cpu.json``)::

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
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, machine  # noqa: E402

CIFAR_DIR = "cifar-10-batches-py"
# the CUDA tests: CPU/CUDA agreement, host syncs, graph replay; DEQ under a CUDA autocast
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_deq_autocast.py")
DRY_RUN_SLACK = 3  # the dry run's time limits: this many times the GPU ones
HELPERS = ("make-cifar", "steps", "run")


# --------------------------------------------------------------------------- helpers


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
    import torch

    info: dict[str, Any] = {**machine(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    return info


def time_steps(args: argparse.Namespace) -> dict[str, Any]:
    from phantomdeq.train import load_config, run_training
    from phantomdeq.train.metrics import read_metrics

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
        # a task with a throughput (language modelling: tokens_per_s) logs it per step
        rates = [float(r["tokens_per_s"]) for r in rows[2:] if "tokens_per_s" in r]
        rec = {
            "precision": precision,
            "steps": len(rows),
            "median_step_s": statistics.median(times) if times else float("nan"),
            **({"median_tokens_per_s": statistics.median(rates)} if rates else {}),
            "min_step_s": min(times) if times else float("nan"),
            "train_loss_first_last": [rows[0]["train_loss"], rows[-1]["train_loss"]],
            "fwd_nstep_mean": statistics.fmean(float(r["fwd_nstep"]) for r in rows),
            "scaler_skipped": sum(int(r.get("scaler_skipped", 0)) for r in rows),
            "run_wall_s": wall,
            "test_acc": result.get("test_acc"),
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
    """One training run; its result with the mean training-epoch time (evaluation excluded)."""
    from phantomdeq.train import load_config, run_training
    from phantomdeq.train.metrics import read_metrics

    cfg = load_config(args.config, args.set)
    t0 = time.perf_counter()
    result = run_training(cfg, args.out_dir, progress=False)
    result["wall_s"] = time.perf_counter() - t0
    epochs = [r for r in read_metrics(Path(args.out_dir) / "metrics.jsonl") if r["kind"] == "epoch"]
    result["epoch_time_s"] = [float(r["epoch_time_s"]) for r in epochs if "epoch_time_s" in r]
    result["overrides"] = args.set
    result["machine"] = _machine(cfg.train.device)
    print(json.dumps(result, default=str), flush=True)
    return result


def helper_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description="helpers of the GPU script")
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


# --------------------------------------------------------------------------- the parts


@dataclass
class Part:
    """One measurement: ``commands`` (run in turn, each under ``limit_s``) write JSON files
    that ``headline`` reads; ``skip`` gives the reason when the part cannot run here."""

    name: str
    limit_s: int
    goal: str
    commands: Callable[[Context], list[list[str]]]
    headline: Callable[[Context], dict[str, Any]]
    skip: Callable[[Context], str | None] = lambda ctx: None
    results: Callable[[Context], dict[str, Any]] = field(default=lambda ctx: {})


@dataclass
class Context:
    dry: bool
    work: Path
    py: str = sys.executable
    output: str = ""  # the last command's stdout and stderr

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    @property
    def graph_modes(self) -> str:
        return "eager" if self.dry else "eager,graph"


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _bench(name: str) -> str:
    return str(ROOT / "benchmarks" / name)


# cuda_tests ---------------------------------------------------------------


def _cuda_tests_cmd(ctx: Context) -> list[list[str]]:
    """The CUDA tests; in a dry run only collected (their CPU cases run in the test suite)."""
    mode = ["--collect-only"] if ctx.dry else [f"--junitxml={ctx.work / 'cuda_tests.xml'}"]
    return [[ctx.py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *mode, *CUDA_TESTS]]


def _cuda_tests_headline(ctx: Context) -> dict[str, Any]:
    path = ctx.work / "cuda_tests.xml"
    if ctx.dry or not path.is_file():
        found = re.search(r"(\d+) tests? collected", ctx.output)
        return {"collected": int(found[1])} if found else {}
    suite = re.search(r"<testsuite [^>]*>", path.read_text())
    out: dict[str, Any] = {}
    if suite:
        for key in ("tests", "failures", "errors", "skipped"):
            m = re.search(rf'\b{key}="(\d+)"', suite[0])
            out[key] = int(m[1]) if m else None
    return out


# solver_overhead ----------------------------------------------------------


def _overhead_cmd(ctx: Context) -> list[list[str]]:
    size = ["--batch", "2", "--size", "8", "--iters", "4", "--repeats", "2"] if ctx.dry else []
    return [
        [ctx.py, _bench("solver_overhead.py"), "--device", ctx.device, "--cells", "mdeq"]
        + ["--modes", ctx.graph_modes, "--torchdeq", *(size or ["--batch", "64", "--repeats", "9"])]
        + ["--out", str(ctx.work / "solver_overhead.json")]
    ]


def _overhead_headline(ctx: Context) -> dict[str, Any]:
    data = _read(ctx.work / "solver_overhead.json") or {}
    return {
        f"{r['solver']}/{r['mode']}": r["ratio"]
        for r in data.get("results", [])
        if r.get("cell") == "mdeq"
    }


# precision ----------------------------------------------------------------


def _cost_cmd(ctx: Context, amp: str) -> list[str]:
    tag = "fp32" if amp == "none" else amp
    size = (
        ["--model", "mdeq_tiny", "--batch", "2", "--fwd-iters", "2", "--bwd-iters", "2"]
        + ["--repeats", "1", "--warmup", "0"]
        if ctx.dry
        else ["--model", "mdeq_cifar10m", "--batch", "64", "--repeats", "5", "--warmup", "2"]
    )
    return [
        ctx.py,
        "-m",
        "phantomdeq",
        "cost",
        "--device",
        ctx.device,
        "--amp",
        amp,
        *size,
        "--no-memory",
        "--methods",
        "ift_broyden,upg_k5",
        "--modes",
        ctx.graph_modes,
        "--out",
        str(ctx.work / f"cost_{tag}"),
    ]


def _precision_headline(ctx: Context) -> dict[str, Any]:
    steps: dict[tuple[str, str, str], float] = {}
    for tag in ("fp32", "bf16"):
        for r in (_read(ctx.work / f"cost_{tag}" / "cost.json") or {}).get("records", []):
            steps[(tag, r["mode"], r["method"])] = r["step_ms"]
    return {
        f"{method}/{mode}": ms / steps[("fp32", mode, method)]
        for (tag, mode, method), ms in sorted(steps.items())
        if tag == "bf16" and ("fp32", mode, method) in steps
    }


def _precision_results(ctx: Context) -> dict[str, Any]:
    return {tag: _read(ctx.work / f"cost_{tag}" / "cost.json") for tag in ("fp32", "bf16")}


# tiny_epoch ---------------------------------------------------------------


def _tiny_epoch_cmd(ctx: Context) -> list[list[str]]:
    per_batch, test = ("8", "8") if ctx.dry else ("10000", "2000")
    data = ctx.work / "cifar"
    shrink = (
        ["data.batch_size=8", "data.eval_batch_size=8", "solver.max_iter=2"]
        + ["eval_solver.max_iter=2", "grad.k=2", "train.bn_recalibration_batches=1"]
        if ctx.dry
        else []
    )
    sets = [
        f"data.root={data}",
        "train.epochs=1",
        f"train.device={ctx.device}",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        *shrink,
    ]
    script = _bench("gpu_check.py")
    return [
        [ctx.py, script, "make-cifar", str(data), "--train-per-batch", per_batch, "--test", test],
        [ctx.py, script, "run", "--config", str(ROOT / "configs" / "mdeq_tiny_cifar10.yaml")]
        + [
            "--out-dir",
            str(ctx.work / "tiny_epoch_run"),
            "--json",
            str(ctx.work / "tiny_epoch.json"),
        ]
        + [arg for s in sets for arg in ("--set", s)],
    ]


def _tiny_epoch_headline(ctx: Context) -> dict[str, Any]:
    data = _read(ctx.work / "tiny_epoch.json") or {}
    times = data.get("epoch_time_s") or []
    return {"epoch_time_s": times[0] if times else None, "test_acc": data.get("test_acc")}


# vs_torchdeq --------------------------------------------------------------


def _vs_cmd(ctx: Context) -> list[list[str]]:
    size = ["--quick"] if ctx.dry else ["--batch", "64", "--repeats", "5"]
    return [
        [ctx.py, _bench("vs_torchdeq.py"), "--device", ctx.device, "--models", "mdeq_tiny"]
        + [*size, "--modes", ctx.graph_modes, "--out", str(ctx.work / "vs_torchdeq.json")]
    ]


def _vs_headline(ctx: Context) -> dict[str, Any]:
    data = _read(ctx.work / "vs_torchdeq.json") or {}
    out: dict[str, Any] = {}
    for r in data.get("timing", []):
        for mode in ctx.graph_modes.split(","):
            suffix = "" if mode == "eager" else f"_{mode}"
            for grad in ("upg", "ift"):
                value = r.get(f"{grad}_step_ratio{suffix}")
                if value is not None:
                    out[f"{grad} {r['solver']}/{mode}"] = value
    return out


def _vs_skip(ctx: Context) -> str | None:
    probe = subprocess.run([ctx.py, "-c", "import torchdeq"], capture_output=True, env=_env(ctx))
    return None if probe.returncode == 0 else "TorchDEQ is not importable (the `peer` extra)"


# digits_bf16 --------------------------------------------------------------


def _digits_cmd(ctx: Context) -> list[list[str]]:
    shrink = (
        ["data.train_size=32", "data.test_size=16", "data.batch_size=16"]
        + ["solver.max_iter=3", "eval_solver.max_iter=3"]
        if ctx.dry
        else []
    )
    sets = ["train.epochs=2", f"train.device={ctx.device}", "log.progress=false"]
    sets += ["log.tensorboard=false", "log.plot=false", *shrink]
    return [
        [
            ctx.py,
            _bench("gpu_check.py"),
            "run",
            "--config",
            str(ROOT / "configs" / "mdeq_tiny_digits.yaml"),
        ]
        + ["--out-dir", str(ctx.work / f"digits_{p}"), "--json", str(ctx.work / f"digits_{p}.json")]
        + [arg for s in [*sets, f"train.precision={p}"] for arg in ("--set", s)]
        for p in ("fp32", "bf16")
    ]


def _digits_headline(ctx: Context) -> dict[str, Any]:
    acc = {
        p: (_read(ctx.work / f"digits_{p}.json") or {}).get("test_acc") for p in ("fp32", "bf16")
    }
    if None in acc.values():
        return {}
    return {
        "fp32_test_acc": acc["fp32"],
        "bf16_test_acc": acc["bf16"],
        "within_2_points": abs(acc["bf16"] - acc["fp32"]) <= 0.02,
    }


def _digits_results(ctx: Context) -> dict[str, Any]:
    return {p: _read(ctx.work / f"digits_{p}.json") for p in ("fp32", "bf16")}


# lm_tokens ----------------------------------------------------------------

LM_GPU_PRESET = "deq_lm_shakespeare_gpu.yaml"
# the dry run: the GPU preset's code paths (Anderson, UPG, bf16 autocast, the text windows)
# at a CPU-sized width and context
LM_DRY_SHRINK = (
    "model.kwargs.width=32",
    "model.kwargs.heads=2",
    "data.context=32",
    "solver.max_iter=4",
    "eval_solver.max_iter=4",
)


def _lm_preset() -> Path | None:
    """The DEQ-LM preset to time: the GPU one when it ships, else the first ``deq_lm*``."""
    gpu = ROOT / "configs" / LM_GPU_PRESET
    if gpu.is_file():
        return gpu
    found = sorted((ROOT / "configs").glob("deq_lm*.yaml"))
    return found[0] if found else None


def _lm_batch(preset: Path) -> int:
    import yaml

    data = yaml.safe_load(preset.read_text()).get("data") or {}
    return int(data.get("batch_size") or 32)


def _lm_cmd(ctx: Context) -> list[list[str]]:
    preset = _lm_preset()
    assert preset is not None
    steps, batch = ("3", "2") if ctx.dry else ("20", str(_lm_batch(preset)))
    shrink = [arg for s in LM_DRY_SHRINK for arg in ("--set", s)] if ctx.dry else []
    return [
        [ctx.py, _bench("gpu_check.py"), "steps", "--config", str(preset)]
        + ["--precisions", "fp32,bf16", "--steps", steps, "--batch", batch]
        + ["--device", ctx.device, "--work", str(ctx.work / "lm_runs")]
        + ["--out", str(ctx.work / "lm_tokens.json"), *shrink]
    ]


def _lm_headline(ctx: Context) -> dict[str, Any]:
    """Per precision: median step time and median training tokens/s (the trainer's own
    ``tokens_per_s`` of each step); bf16 / fp32 step time."""
    data = _read(ctx.work / "lm_tokens.json") or {}
    recs = {r["precision"]: r for r in data.get("records") or []}
    if not recs:
        return {}
    out: dict[str, Any] = {"preset": Path(str(data.get("config", ""))).name}
    for p, r in recs.items():
        out[f"{p}_step_s"] = r["median_step_s"]
        out[f"{p}_tokens_per_s"] = r.get("median_tokens_per_s")
    if "fp32" in recs and "bf16" in recs:
        out["bf16_over_fp32_step"] = recs["bf16"]["median_step_s"] / recs["fp32"]["median_step_s"]
    return out


def _lm_skip(ctx: Context) -> str | None:
    return None if _lm_preset() else "no DEQ-LM preset ships (configs/deq_lm*.yaml)"


PARTS: tuple[Part, ...] = (
    Part("cuda_tests", 60, "no failures", _cuda_tests_cmd, _cuda_tests_headline),
    Part(
        "solver_overhead",
        90,
        "solve / bare f <= 1.3 (MDEQ-Tiny)",
        _overhead_cmd,
        _overhead_headline,
    ),
    Part(
        "precision",
        120,
        "bf16 / fp32 step <= 0.67 (MDEQ-CIFAR-10M)",
        lambda ctx: [_cost_cmd(ctx, "none"), _cost_cmd(ctx, "bf16")],
        _precision_headline,
        results=_precision_results,
    ),
    Part(
        "tiny_epoch", 150, "<= 12 s per epoch (50k images)", _tiny_epoch_cmd, _tiny_epoch_headline
    ),
    Part(
        "vs_torchdeq",
        100,
        "phantomdeq / TorchDEQ step <= 0.6",
        _vs_cmd,
        _vs_headline,
        skip=_vs_skip,
    ),
    Part(
        "digits_bf16",
        90,
        "bf16 within 2 points of fp32 after 2 digits epochs",
        _digits_cmd,
        _digits_headline,
        results=_digits_results,
    ),
    Part("lm_tokens", 60, "tokens/s (no goal)", _lm_cmd, _lm_headline, skip=_lm_skip),
)
_RESULT_FILES = {
    "solver_overhead": "solver_overhead.json",
    "tiny_epoch": "tiny_epoch.json",
    "vs_torchdeq": "vs_torchdeq.json",
    "lm_tokens": "lm_tokens.json",
}


def _env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "src"), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    site = ctx.work / "site"
    if site.is_dir():
        paths.append(str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    if ctx.dry:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _install_torchdeq(ctx: Context) -> None:
    """TorchDEQ from a wheel in ``.whl/`` (a machine without network), when not importable."""
    wheels = sorted((ROOT / ".whl").glob("torchdeq*.whl"))
    if not wheels or _vs_skip(ctx) is None:
        return
    subprocess.run(
        [ctx.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        + ["--target", str(ctx.work / "site"), *map(str, wheels)],
        check=False,
    )


def run_part(part: Part, ctx: Context) -> dict[str, Any]:
    reason = part.skip(ctx)
    rec: dict[str, Any] = {"goal": part.goal, "limit_s": part.limit_s}
    if reason is not None:
        print(f"== {part.name}: skipped ({reason})", flush=True)
        return {**rec, "status": "skipped", "reason": reason}
    # a dry run's low precision runs on reference CPU kernels, on a machine that may be shared
    limit = part.limit_s * (DRY_RUN_SLACK if ctx.dry else 1)
    t0 = time.perf_counter()
    commands, tail, status = part.commands(ctx), "", "ok"
    rc = 0
    for cmd in commands:
        left = limit - (time.perf_counter() - t0)
        print(f"== {part.name}: {' '.join(cmd)}", flush=True)
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=_env(ctx),
                capture_output=True,
                text=True,
                timeout=max(left, 1.0),
            )
            rc = proc.returncode
            ctx.output = proc.stdout + proc.stderr
            tail = ctx.output[-3000:]
        except subprocess.TimeoutExpired as exc:
            rc, status = 124, "timeout"
            out = exc.stdout or b""
            tail = (out.decode() if isinstance(out, bytes) else out)[-3000:]
        if rc != 0:
            status = "timeout" if rc == 124 else "failed"
            break
    wall = time.perf_counter() - t0
    print(f"   {status} (rc {rc}) in {wall:.1f} s", flush=True)
    name = _RESULT_FILES.get(part.name)
    return {
        **rec,
        "status": status,
        "rc": rc,
        "wall_s": wall,
        "commands": [" ".join(c) for c in commands],
        "headline": part.headline(ctx),
        "result": part.results(ctx) if name is None else _read(ctx.work / name),
        "output_tail": tail,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in HELPERS:
        return helper_main(argv)
    names = [p.name for p in PARTS]
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the one JSON")
    ap.add_argument("--parts", default=",".join(names), help=f"comma list of {names}")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (seconds)")
    ap.add_argument("--work", type=Path, default=None, help="folder of the parts' own files")
    args = ap.parse_args(argv)
    chosen = [p for p in args.parts.split(",") if p]
    unknown = [p for p in chosen if p not in names]
    if unknown or not chosen:
        ap.error(f"--parts: unknown {unknown}; allowed: {', '.join(names)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(dry=args.dry_run, work=work.resolve())
    if not ctx.dry:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device here; --dry-run runs the same parts on the CPU")
    _install_torchdeq(ctx)
    t0 = time.perf_counter()
    payload: dict[str, Any] = {
        "dry_run": ctx.dry,
        "machine": _machine(ctx.device),
        "loadavg_start": loadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parts": {},
    }
    for part in PARTS:
        if part.name in chosen:
            payload["parts"][part.name] = run_part(part, ctx)
    payload["wall_s"] = time.perf_counter() - t0
    payload["loadavg_end"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    for name, rec in payload["parts"].items():
        head = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in (rec.get("headline") or {}).items()
        )
        print(f"{name:<16} {rec['status']:<8} {head or rec.get('reason', '')} [{rec['goal']}]")
    print(f"wrote {args.out} ({payload['wall_s']:.0f} s)")
    bad = [n for n, r in payload["parts"].items() if r["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
