"""Ablation grids of training runs (paper Sec. 3, Table 1 and Fig. 3), as the command

    phantomdeq ablate --config configs/X.yaml [--config configs/Y.yaml ...]
                      --grid "grad=ift,upg,npg" --grid "k=1,3,5,7,9" --grid "lam=0.5,1.0"
                      --seeds 3 --out DIR [--jobs J] [--set key=value ...]

Every ``--config`` (a preset, e.g. a Table 1 row from ``configs/ablation/``) is combined with
the cartesian product of the ``--grid`` axes and trained once per seed (``train.seed`` = the
config's seed + 0, 1, ..., seeds - 1).  ``--set`` overrides apply to every run, before the grid.

Grid keys.  Short names map to config fields -- ``grad`` -> ``grad.name``, every estimator
option by its name (``k`` -> ``grad.k``, ``lam`` -> ``grad.lam``, ``checkpoint``, ...; from
``pdq.grad.options``), ``optim`` -> ``optim.name``, ``lr`` -> ``optim.lr``, ``dropout`` ->
``model.dropout``, ``pretrain`` -> ``train.pretrain_steps``, ``unrolled`` ->
``train.unrolled_steps``, ``fwd`` -> ``solver.max_iter``, ``epochs`` -> ``train.epochs``,
``batch`` -> ``data.batch_size``, ``train_size`` -> ``data.train_size`` -- and any dotted config key
(``optim.name``, ``model.dropout``, ``train.pretrain_steps``, ...) is used as is.  Values are
comma-separated and read as YAML scalars (``0.5``, ``true``, ``null``).  Every resulting config
is parsed and validated before the first run starts; a bad key or value exits with status 2.

Collapsing.  Options that do not apply to a run are reset to their defaults before runs are
identified (``phantomdeq.train.config.unused_options``, derived from the classes' declared
options): the ``grad.*`` options the estimator does not take (``grad.k``/``grad.lam`` unless
``upg``/``npg``, ``grad.checkpoint`` unless ``upg``, ``grad.backward_solver`` unless ``ift``),
the ``solver.*`` options of other solver classes, ``train.unrolled_steps`` without
pretraining.  Runs whose resulting configs are equal (ignoring ``log.*``, ``train.device``,
``train.num_threads``, ``data.num_workers`` and ``train.monitor_*``, which do not change what is
trained) are run once,
so ``grad=ift`` does not repeat across the ``k``/``lam`` axes.

Resuming.  Run ``i`` of a config lives in ``DIR/runs/<label>-<hash>-s<seed>/``; it is finished
when its ``result.json`` exists (written after training ends, also for a run that diverged, whose
status is ``failed``), and finished runs are skipped when the command is started again; an
interrupted run continues from its ``last.pt``.

Outputs in ``DIR`` (covering every finished run under ``DIR/runs``, so several invocations
with different presets can fill one study): ``ablation.json`` (per-run results and per-config
aggregates), ``table.md`` (Table-1 style: mean (best) test accuracy over seeds, time per
training epoch, forward steps; also printed) and ``fig3.png`` (test accuracy vs ``k``, one
curve per method and ``λ``, estimators without ``k`` as horizontal lines).

Exit status: 0 when every run finished (diverged runs count as finished and are reported),
1 when a run crashed, 2 for a bad command line / grid / config, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phantomdeq import grad as pdq_grad
from phantomdeq.cli import user_error
from phantomdeq.cpu_memory import cpu_memory_from_env
from phantomdeq.train.config import NESTED_SOLVERS

from .command import Outputs, Parser, UsageError, run_command
from .report import write_reports

__all__ = [
    "GRID_ALIASES",
    "RunSpec",
    "StopWorkers",
    "build_parser",
    "ignore_stop_signals",
    "init_worker",
    "main",
    "plan_runs",
]

PROG = "phantomdeq ablate"

#: short grid keys -> dotted config keys (every estimator option under its own name)
GRID_ALIASES: dict[str, str] = {
    "grad": "grad.name",
    **{
        k: f"grad.{k}"
        for name in pdq_grad.ESTIMATORS
        for k in pdq_grad.options(name)
        if k not in NESTED_SOLVERS
    },
    "optim": "optim.name",
    "lr": "optim.lr",
    "dropout": "model.dropout",
    "pretrain": "train.pretrain_steps",
    "unrolled": "train.unrolled_steps",
    "fwd": "solver.max_iter",
    "epochs": "train.epochs",
    "batch": "data.batch_size",
    "train_size": "data.train_size",
}

#: config fields that do not change what is trained (left out of a run's identity)
_NOT_IDENTITY = (
    ("train", "device"),
    ("train", "num_threads"),
    ("data", "num_workers"),
    # the gradient-quality monitor only observes (it changes no update)
    ("train", "monitor_every"),
    ("train", "monitor_params"),
    ("train", "monitor_solver"),
    ("train", "monitor_compare"),
)


class GridError(UsageError):
    """A bad ``--grid`` specification (the message names the key / value and what is allowed)."""


# --------------------------------------------------------------------------- planning


@dataclass
class RunSpec:
    """One training run of the study."""

    label: str  # readable configuration label (no seed)
    key: str  # hash of the canonical configuration (no seed)
    seed: int
    config: dict[str, Any]  # canonical, resolved config mapping (seed included)
    source: str  # the preset file
    assignment: dict[str, Any] = field(default_factory=dict)  # grid values that apply

    @property
    def name(self) -> str:
        return f"{_slug(self.label)}-{self.key[:8]}-s{self.seed}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=]+", "_", text).strip("_")[:80] or "run"


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    """``["grad=ift,upg", "k=1,3"]`` -> ``[("grad.name", ["ift", "upg"]), ("grad.k", [1, 3])]``."""
    import yaml

    out: list[tuple[str, list[Any]]] = []
    seen: set[str] = set()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise GridError(f"--grid: expected KEY=V1,V2,... (e.g. k=1,3,5), got {item!r}")
        dotted = GRID_ALIASES.get(key, key)
        if "." not in dotted:
            raise GridError(
                f"--grid: unknown key {key!r}; use a dotted config key (e.g. optim.name) or one of "
                f"{', '.join(GRID_ALIASES)}"
            )
        if dotted in seen:
            raise GridError(f"--grid: key {key!r} ({dotted}) given twice")
        seen.add(dotted)
        values: list[Any] = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                raise GridError(f"--grid {key}: empty value in {text!r}")
            try:
                value = yaml.safe_load(part)
            except yaml.YAMLError as exc:
                raise GridError(f"--grid {key}: cannot parse value {part!r}: {exc}") from exc
            if value in values:
                raise GridError(f"--grid {key}: value {part!r} given twice")
            values.append(value)
        out.append((dotted, values))
    return out


def _identity(cfg_dict: dict[str, Any]) -> str:
    d = copy.deepcopy(cfg_dict)
    d.pop("log", None)
    d["train"].pop("seed", None)
    for section, key in _NOT_IDENTITY:
        d[section].pop(key, None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def plan_runs(
    configs: list[Path],
    grid: list[tuple[str, list[Any]]],
    *,
    seeds: int,
    overrides: list[str] | None = None,
) -> list[RunSpec]:
    """Every (config, grid point, seed) as a :class:`RunSpec`, validated and de-duplicated.

    Raises :class:`phantomdeq.train.config.ConfigError` (naming the config file, the grid point
    and the offending key) for any invalid combination, before anything is run.
    """
    from phantomdeq.train.config import (
        ConfigError,
        config_to_dict,
        load_config,
        reset_options,
        unused_options,
    )

    if seeds < 1:
        raise GridError(f"--seeds: must be >= 1, got {seeds}")
    keys = [k for k, _ in grid]
    points = list(itertools.product(*[vals for _, vals in grid])) if grid else [()]
    specs: list[RunSpec] = []
    seen: set[tuple[str, int]] = set()
    for path in configs:
        for point in points:
            assignment = dict(zip(keys, point))
            sets = list(overrides or []) + [f"{k}={json.dumps(v)}" for k, v in assignment.items()]
            where = f"{path}" + (
                " with " + ", ".join(f"{k}={v}" for k, v in assignment.items())
                if assignment
                else ""
            )
            try:
                loaded = load_config(path, sets)
                unused = unused_options(loaded)
                cfg = reset_options(loaded, unused)
                cfg.validate()
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            cfg_dict = config_to_dict(cfg)
            key = _identity(cfg_dict)
            # keep only the grid values that still apply after collapsing
            applied = {
                k: v
                for k, v in assignment.items()
                if not any(k == u or k.startswith(u + ".") for u in unused)
            }
            short = {v: k for k, v in GRID_ALIASES.items()}
            label = " ".join([path.stem] + [f"{short.get(k, k)}={v}" for k, v in applied.items()])
            base_seed = cfg.train.seed
            for i in range(seeds):
                seed = base_seed + i
                if (key, seed) in seen:
                    continue
                seen.add((key, seed))
                run_cfg = copy.deepcopy(cfg_dict)
                run_cfg["train"]["seed"] = seed
                specs.append(
                    RunSpec(
                        label, key, seed, run_cfg, str(path), {k: v for k, v in applied.items()}
                    )
                )
    return specs


# --------------------------------------------------------------------------- running


def _find_finished(out: Path, spec: RunSpec) -> Path | None:
    for p in sorted((out / "runs").glob(f"*-{spec.key[:8]}-s{spec.seed}/result.json")):
        return p.parent
    return None


def _epoch_stats(run_dir: Path) -> dict[str, float]:
    """Mean training-epoch time (evaluation and monitor excluded), mean training forward
    steps and the gradient-norm statistics (:func:`grad_norm_stats`) of the DEQ stage, from
    ``metrics.jsonl``."""
    from phantomdeq.train.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = read_metrics(path)
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    steps = [r for r in rows if r.get("kind") == "step" and r.get("stage") == "deq"]
    out: dict[str, float] = {}
    times = [r["epoch_time_s"] for r in epochs if isinstance(r.get("epoch_time_s"), int | float)]
    if times:
        out["epoch_time_s"] = sum(times) / len(times)
    ns = [r["fwd_nstep"] for r in steps if isinstance(r.get("fwd_nstep"), int | float)]
    if ns:
        out["train_fwd_nstep"] = sum(ns) / len(ns)
    out.update(grad_norm_stats(steps))
    accs = [r["test_acc"] for r in epochs if isinstance(r.get("test_acc"), int | float)]
    if accs:
        out["acc_curve"] = accs  # type: ignore[assignment]
    return out


def grad_norm_stats(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Median and largest global gradient norm (before clipping) over the logged DEQ-stage
    steps, and how many were not finite (null in ``metrics.jsonl``). Empty for runs logged
    before ``grad_norm`` was recorded."""
    import statistics

    logged = [r for r in steps if "grad_norm" in r]
    if not logged:
        return {}
    norms = [float(r["grad_norm"]) for r in logged if isinstance(r["grad_norm"], int | float)]
    out = {"grad_norm_nonfinite": float(len(logged) - len(norms))}
    if norms:
        out["grad_norm_median"] = statistics.median(norms)
        out["grad_norm_max"] = max(norms)
    return out


def run_one(config: dict[str, Any], run_dir: str, threads: int = 0) -> dict[str, Any]:
    """Train one run into ``run_dir`` and write its ``result.json`` (status ``ok`` or
    ``failed`` for a diverged run). Resumes from ``last.pt`` when present."""
    import torch

    from phantomdeq.errors import DEQError
    from phantomdeq.train.config import config_from_dict
    from phantomdeq.train.trainer import TrainingError, run_training

    out = Path(run_dir)
    cfg = config_from_dict(config)
    cfg.log.progress = False
    if threads > 0 and cfg.train.num_threads == 0:
        torch.set_num_threads(threads)
    resume = (out / "last.pt").is_file()
    t0 = time.perf_counter()
    try:
        # a run killed before its first checkpoint is started again from scratch
        metrics = run_training(cfg, out, resume=resume, overwrite=not resume, progress=False)
        status, message = "ok", ""
    except (TrainingError, DEQError) as exc:
        metrics, status, message = {}, "failed", str(exc)
    result: dict[str, Any] = {
        "status": status,
        "message": message,
        "wall_s": time.perf_counter() - t0,
        **{k: v for k, v in metrics.items() if k != "out_dir"},
        **_epoch_stats(out),
    }
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
    }
    tmp = out / "result.json.tmp"
    out.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(clean, indent=2))
    os.replace(tmp, out / "result.json")
    return clean


def _run_worker(args: tuple[dict[str, Any], str, int]) -> dict[str, Any]:
    return run_one(*args)


# --------------------------------------------------------------------------- stopping the pool

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals() -> None:
    """Pool initializer: a worker ignores SIGINT/SIGTERM outside a run. Inside one the trainer's
    own handlers stop it after the current step; between runs a signal would kill the worker,
    and a dead worker breaks the whole pool (whose remaining workers are then killed without
    their checkpoint)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def init_worker(retain_memory: bool) -> None:
    """Pool initializer of ``ablate --jobs``: :func:`ignore_stop_signals`, and the parent's CPU
    memory policy (a spawned worker starts with the C library's defaults; see
    :func:`phantomdeq.cpu_memory.retain_cpu_memory`)."""
    ignore_stop_signals()
    if retain_memory:
        from phantomdeq.cpu_memory import retain_cpu_memory

        retain_cpu_memory()


class StopWorkers:
    """While a study runs in pool workers, SIGINT/SIGTERM to this process cancel the runs not
    started and stop the running ones: each worker that holds a run folder's lock
    (:data:`~phantomdeq.train.run_folder.LOCK_FILE`, which names its pid) gets SIGTERM once per
    run, so its trainer checkpoints after the current step and stops; :meth:`poke` is called
    again while waiting, for runs a worker locks after the signal. (On SIGINT the runs that
    already held their lock are left to the terminal, which sends SIGINT to every process of
    the foreground group: a second signal would stop them without the checkpoint.) The caller
    collects what the workers return and then raises
    :class:`~phantomdeq.train.guard.TrainingInterrupted` -- no worker trains on after
    the command has gone."""

    def __init__(self, pool: Any, futures: list[Any], prog: str, runs: Path) -> None:
        self.pool = pool
        self.prog = prog
        self.futures = futures
        self.runs = runs
        self.signum = 0
        self._told: set[tuple[int, str]] = set()
        self._previous: dict[int, Any] = {}

    def _holders(self) -> set[tuple[int, str]]:
        """(pid, run folder) of this pool's workers holding a run folder's lock."""
        from phantomdeq.train.run_folder import LOCK_FILE

        workers = set(getattr(self.pool, "_processes", None) or {})
        out = set()
        for lock in self.runs.glob(f"*/{LOCK_FILE}"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(lock.read_text().strip() or 0)
                if pid in workers and not (lock.parent / "result.json").exists():
                    out.add((pid, lock.parent.name))
        return out

    def poke(self) -> None:
        """SIGTERM to each worker in a run it has not been told to stop yet."""
        for pid, run in self._holders() - self._told:
            self._told.add((pid, run))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            return  # already stopping: wait for the workers' checkpoints
        self.signum = signum
        print(
            f"{self.prog}: {signal.Signals(signum).name} received; stopping the running "
            "runs after their current step",
            file=sys.stderr,
            flush=True,
        )
        for fut in self.futures:
            fut.cancel()  # not started yet
        if signum == signal.SIGINT:
            self._told |= self._holders()
        self.poke()

    def __enter__(self) -> StopWorkers:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _execute(specs: list[RunSpec], out: Path, jobs: int) -> tuple[int, int]:
    """Run the unfinished specs; returns (ran, crashed)."""
    # seed-major order: every configuration gets its first seed before any gets its second
    todo = sorted(
        (s for s in specs if _find_finished(out, s) is None),
        key=lambda s: (s.seed, specs.index(s)),
    )
    skipped = len(specs) - len(todo)
    print(
        f"{PROG}: {len(specs)} runs planned, {skipped} already finished, {len(todo)} to run"
        + (f" ({jobs} at a time)" if jobs > 1 and todo else ""),
        file=sys.stderr,
    )
    crashed = 0
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0

    def report(i: int, spec: RunSpec, res: dict[str, Any] | None, err: str = "") -> None:
        if res is None:
            print(f"[{i}/{len(todo)}] {spec.name}: crashed: {err}", file=sys.stderr)
            return
        acc = res.get("test_acc")
        acc_s = f"test acc {100 * acc:.2f}%" if isinstance(acc, float) else res["status"]
        print(f"[{i}/{len(todo)}] {spec.name}: {acc_s} ({res['wall_s']:.0f}s)", file=sys.stderr)

    if jobs <= 1:
        for i, spec in enumerate(todo, 1):
            res = run_one(spec.config, str(out / "runs" / spec.name))
            report(i, spec, res)
        return len(todo), 0
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    retain = cpu_memory_from_env() == "retain"  # validated by the command line already
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=init_worker, initargs=(retain,)
    ) as pool:
        futures = {
            pool.submit(_run_worker, (s.config, str(out / "runs" / s.name), threads)): s
            for s in todo
        }
        pending, i = set(futures), 0
        with StopWorkers(pool, list(futures), PROG, out / "runs") as stop:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                if stop.signum:
                    stop.poke()  # a run locked after the signal
                for fut in done:
                    i += 1
                    spec = futures[fut]
                    if stop.signum and (fut.cancelled() or fut.exception() is not None):
                        continue  # stopped or never started: resumed by the next command
                    try:
                        report(i, spec, fut.result())
                    except Exception as exc:  # a crashed run must not stop the others
                        crashed += 1
                        report(i, spec, None, f"{type(exc).__name__}: {exc}")
    if stop.signum:
        from phantomdeq.train.guard import TrainingInterrupted

        raise TrainingInterrupted(stop.signum, "the running runs checkpointed and stopped")
    return len(todo), crashed


# --------------------------------------------------------------------------- command


def build_parser() -> Parser:
    from phantomdeq.train.config import add_set_argument

    p = Parser(
        PROG, "Train a grid of configurations x seeds and tabulate them (paper Table 1, Fig. 3)."
    )
    p.add_argument(
        "--config",
        type=Path,
        action="append",
        default=[],
        help="YAML config file or preset name (e.g. ablation/mnist_upg; `phantomdeq configs` "
        "lists them); repeatable; required "
        "unless --report-only",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help=f"grid axis; KEY is a dotted config key or one of {', '.join(GRID_ALIASES)} (repeatable)",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration")
    p.add_argument("--out", type=Path, required=True, help="study directory")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    add_set_argument(p, "override a config value in every run (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite the reports")
    return p


def _command(args: argparse.Namespace, argv: list[str]) -> int:
    from phantomdeq.train.config import ConfigError
    from phantomdeq.train.guard import TrainingInterrupted

    if args.jobs < 1:
        raise UsageError(f"--jobs: must be >= 1, got {args.jobs}")
    if args.seeds < 1:
        raise UsageError(f"--seeds: must be >= 1, got {args.seeds}")
    out: Path = args.out
    if not args.report_only and not args.config:
        raise UsageError("--config: at least one config file is required (unless --report-only)")
    crashed = 0
    if not args.report_only:
        try:
            specs = plan_runs(
                args.config, parse_grid(args.grid), seeds=args.seeds, overrides=args.overrides
            )
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        if args.dry_run:
            for s in specs:
                done = "done" if _find_finished(out, s) else "todo"
                print(f"{done}  {s.name}")
            return 0
        (out / "runs").mkdir(parents=True, exist_ok=True)
        for s in specs:
            run_dir = out / "runs" / s.name
            if _find_finished(out, s) is None:
                run_dir.mkdir(parents=True, exist_ok=True)
                meta = dataclasses.asdict(s)
                (run_dir / "ablation_run.json").write_text(json.dumps(meta, indent=2, default=str))
        t0 = time.perf_counter()
        try:
            ran, crashed = _execute(specs, out, args.jobs)
        except TrainingInterrupted as exc:
            return user_error(
                PROG,
                f"interrupted by {exc.signal_name} ({exc}); run the same command again to continue",
                exc.exit_code,
            )
        except KeyboardInterrupt:
            return user_error(PROG, "interrupted; run the same command again to continue", 130)
        print(f"{PROG}: {ran} runs in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    if not (out / "runs").is_dir():
        raise UsageError(f"--out: no runs under {str(out)!r}")
    outputs = Outputs(out)
    write_reports(outputs, argv, prog=PROG)
    outputs.report()
    return 1 if crashed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``phantomdeq ablate``: 0 when every run finished, 1 when a run crashed, 2 for a bad
    command line / grid / config, 130 / 143 when interrupted."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(build_parser(), lambda ns: _command(ns, args), args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
