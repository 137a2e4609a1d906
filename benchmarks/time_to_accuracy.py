"""Question: how long does MDEQ-Tiny take to reach a test accuracy on MNIST when trained with
phantomdeq UPG(5, 0.5) and IFT, side by side with TorchDEQ 0.1.0's ``grad=5, tau=0.5`` and
``ift=True``?

The model is the one of the warm-start study on the full MNIST split (EXPERIMENTS.md, "Warm-
started fixed points on MNIST, full training split"): the MNIST ablation preset
``configs/ablation/mnist_upg.yaml`` with the equilibrium cell at 7x7 and 4x4
(``model.overrides.downsample_times: 2``), all 60,000 training images, batch 64, dropout 0.25,
Adam (lr 2e-3, 20 warm-up steps, cosine over ``train.epochs`` = 3 epochs, gradient clipping at
5), the forward Anderson solve (m 5, regularisation 1e-4) to a relative residual of 1e-2 in at
most 20 evaluations of ``f``, evaluation with Anderson to 1e-3 in at most 12 after precise
BatchNorm (4 batches); here tested on the **full** 10,000-image test set (the study used 2000).
IFT (both libraries): backward Anderson to a relative residual of 1e-4 in at most 10 steps (the
IFT preset's ``grad.backward_solver``), no unrolled pretraining (every method starts from the
same weights).

What is the same for every method of a seed: the initial weights (one ``state_dict`` built from
``seed``, loaded into every model; its SHA-256 is recorded per run), the data order (one seeded
permutation per epoch, ``epoch_permutation(n, seed, epoch)``), the per-step generator of the
variational-dropout masks and the augmentation (``seed_of(seed, epoch, batch)``), the global RNG
(re-seeded before every step), optimiser, schedule, clipping, batch and data. What differs is
the DEQ layer only: phantomdeq's ``DEQ`` (``UPG(5, 0.5)`` or ``IFT``) or an adapter that calls
TorchDEQ's ``get_deq`` (``core="sliced"``, ``grad=5, tau=0.5`` or ``ift=True``) on the same
cell, with the same forward solver kind, Anderson memory and regularisation, stop mode,
tolerance and maximum evaluations (for Broyden, TorchDEQ gets one ``max_iter`` fewer, see
``vs_torchdeq.py``); each library keeps its own stopping test and returned iterate.

Each method trains until its test accuracy, checked every ``--eval-every`` steps on the whole
test set (and once more when its cap is hit), reaches ``--target``, or until its own training
clock reaches ``--cap-min`` minutes. The training clock is the wall time of the training steps
(batch, forward, loss, backward, clipping, optimiser step); evaluation (precise BatchNorm + test
pass) is timed apart and excluded. Process CPU time (``time.process_time``: every thread of the
process) is recorded beside it, for the machine is shared.

Methods run **interleaved, one step each in turn, in one process per seed**: a time-to-accuracy
run lasts many minutes, and on a shared machine the load drifts over such spans; run one after
the other, each method would see a different load and the ratio of their times would measure
the drift. Interleaved step by step, every method sees the same load, as in
``_common.interleaved_times``. ``--jobs N`` runs N seeds at once (one process each).

    OMP_NUM_THREADS=1 python benchmarks/time_to_accuracy.py --set data.root=PATH/TO/mnist \\
        --seeds 0,1 --jobs 2 --threads 1 --cap-min 20 --target 0.98 --eval-every 200 \\
        --out benchmarks/results/time_to_accuracy.json

``--train-size/--test-size`` take seeded subsets for smoke runs; ``--config`` and ``--set``
change the base config (e.g. ``--set data.name=digits``). Exits 0 with a message when TorchDEQ
is not importable and a TorchDEQ method is asked for.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
from _common import loadavg, machine, print_table, write_json  # noqa: E402
from phantomdeq.train.build import (  # noqa: E402
    LRSchedule,
    build_grad,
    build_model,
    build_solver,
    make_optimizer,
)
from phantomdeq.train.config import Config, config_to_dict, load_config  # noqa: E402
from phantomdeq.train.data import (  # noqa: E402
    Batches,
    augment,
    evaluate,
    load_data,
    recalibrate_batchnorm,
)
from phantomdeq.train.distributed import (  # noqa: E402
    DistInfo,
    epoch_permutation,
    seed_everything,
    seed_of,
    shard_batches,
)
from phantomdeq.train.guard import grad_norm  # noqa: E402
from vs_torchdeq import TD_SOLVER, _import_torchdeq, td_iters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "ablation" / "mnist_upg.yaml"
#: the warm-start study's full-split variant (EXPERIMENTS.md), on the full test set
STUDY_SETS = (
    "data.train_size=null",
    "data.test_size=null",
    "data.batch_size=64",
    "model.overrides.downsample_times=2",
    "train.epochs=3",
    "solver.tol=0.01",
    "solver.max_iter=20",
)
#: IFT's backward solve: the IFT preset's (configs/ablation/mnist_ift.yaml)
IFT_BACKWARD = {"name": "anderson", "max_iter": 10, "tol": 1.0e-4}
METHODS = {
    "pdq_upg": ("phantomdeq", "UPG(k=5, lam=0.5)"),
    "pdq_ift": ("phantomdeq", "IFT (backward Anderson)"),
    "td_upg": ("torchdeq", "grad=5, tau=0.5"),
    "td_ift": ("torchdeq", "ift=True (b_solver anderson)"),
}
FULL_RUN = {"cap_min": 20.0, "target": 0.98, "eval_every": 200, "min_seeds": 2}


# --------------------------------------------------------------------------- the DEQ layers


class TorchDEQInfo:
    """The solver statistics of a TorchDEQ solve in the shape the trainer's helpers read
    (``nstep``, ``rel_residual``, ``converged`` per sample; ``states`` None)."""

    def __init__(self, info: dict[str, Tensor], tol: float, z: tuple[Tensor, ...]) -> None:
        self.nstep = info["nstep"].float()
        self.rel_residual = info["rel_lowest"].float()
        self.converged = self.rel_residual <= tol
        self.states = None
        self.state_weights = None
        self.z = z


class TorchDEQLayer(nn.Module):
    """Stands in for ``MDEQ.deq``: ``forward(z0, x) -> (z, info)`` solved by TorchDEQ on the
    same cell ``f`` (registered as ``f``, so the model's ``state_dict`` keys are those of the
    phantomdeq model). Training mode uses ``train_deq``, eval mode ``eval_deq`` (TorchDEQ has one
    tolerance for both; the config's eval solver has its own). The TorchDEQ modules hold no
    parameters and are kept out of the module tree."""

    def __init__(
        self,
        cell: nn.Module,
        *,
        train_deq: Any,
        eval_deq: Any,
        solver_kwargs: dict[str, Any],
        tol: float,
        eval_tol: float,
    ) -> None:
        super().__init__()
        self.f = cell
        self._deqs = {True: train_deq, False: eval_deq}
        self._tols = {True: tol, False: eval_tol}
        self.solver_kwargs = dict(solver_kwargs)

    def forward(self, z0: Any, x: Tensor) -> tuple[tuple[Tensor, ...], TorchDEQInfo]:
        deq = self._deqs[self.training]
        deq.train(self.training)
        cell = self.f
        z_out, info = deq(lambda *zs: cell(zs, x), list(z0), solver_kwargs=dict(self.solver_kwargs))
        z = tuple(z_out[-1])
        return z, TorchDEQInfo(info, self._tols[self.training], z)


def _td_deq(get_deq: Any, solver: Any, *, grad: str, k: int, lam: float, backward: Any) -> Any:
    """TorchDEQ's ``get_deq`` with ``solver``'s kind, budget, tolerance and stop mode; for IFT
    the backward solve of ``backward``'s."""
    name = solver.name
    if name not in TD_SOLVER:
        raise SystemExit(f"solver {name!r}: TorchDEQ has {sorted(TD_SOLVER)}")
    kw: dict[str, Any] = {
        "core": "sliced",
        "f_solver": TD_SOLVER[name],
        "f_max_iter": td_iters(name, solver.max_iter),
        "f_tol": solver.tol,
        "f_stop_mode": solver.stop,
        "eval_factor": 1.0,
    }
    if grad == "ift":
        kw.update(
            ift=True,
            b_solver=TD_SOLVER[backward.name],
            b_max_iter=td_iters(backward.name, backward.max_iter),
            b_tol=backward.tol,
            b_stop_mode=backward.stop,
        )
    else:
        kw.update(grad=k, tau=lam)
    return get_deq(**kw)


def _td_solver_kwargs(solver: Any) -> dict[str, Any]:
    return {"m": solver.m, "lam": solver.lam} if solver.name == "anderson" else {}


def build_method(
    method: str, cfg: Config, info: Any, state: dict[str, Tensor], get_deq: Any
) -> nn.Module:
    """The MDEQ-Tiny of ``cfg`` for ``method``, with the weights ``state``."""
    from phantomdeq.train.config import config_from_dict

    raw = config_to_dict(cfg)
    if method == "pdq_ift":
        raw["grad"] = {
            "name": "ift",
            "backward_solver": dict(IFT_BACKWARD),
            "warn_unconverged": False,  # TorchDEQ does not warn either
        }
    model = build_model(config_from_dict(raw), info=info)
    if method.startswith("td_"):
        solver = build_solver(cfg.solver)
        eval_solver = build_solver(cfg.eval_solver) if cfg.eval_solver is not None else solver
        backward = pdq.solvers.from_name(**IFT_BACKWARD)
        grad = "ift" if method == "td_ift" else "upg"
        est = build_grad(cfg.grad)
        k, lam = int(est.k), float(est.lam)
        train_deq = _td_deq(get_deq, solver, grad=grad, k=k, lam=lam, backward=backward)
        eval_deq = _td_deq(get_deq, eval_solver, grad=grad, k=k, lam=lam, backward=backward)
        if solver.name != eval_solver.name or _td_solver_kwargs(solver) != _td_solver_kwargs(
            eval_solver
        ):
            raise SystemExit("TorchDEQ methods: the eval solver must be of the training kind")
        model.deq = TorchDEQLayer(  # type: ignore[assignment]
            model.f,  # type: ignore[arg-type]
            train_deq=train_deq,
            eval_deq=eval_deq,
            solver_kwargs=_td_solver_kwargs(solver),
            tol=solver.tol,
            eval_tol=eval_solver.tol,
        )
    model.load_state_dict(state, strict=True)
    return model


def weights_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- one run


class Run:
    """One method of one seed: its model, optimiser, schedule, position and clocks."""

    def __init__(
        self,
        method: str,
        model: nn.Module,
        cfg: Config,
        *,
        seed: int,
        schedule_steps: int,
        n_train: int,
    ) -> None:
        self.method = method
        self.model = model
        self.cfg = cfg
        self.seed = seed
        self.n_train = n_train
        self.optimizer = make_optimizer(model, cfg.optim)
        o = cfg.optim
        self.schedule = LRSchedule(
            self.optimizer,
            base_lr=o.lr,
            total_steps=schedule_steps,
            warmup_steps=o.warmup_steps,
            min_lr=o.min_lr,
            kind=o.schedule,
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.epoch = 0
        self.batches: list[Tensor] = []
        self.pos = 0
        self.train_s = 0.0
        self.cpu_s = 0.0
        self.eval_s = 0.0
        self.step_times: list[float] = []
        self.step_cpu: list[float] = []
        self.fwd_nsteps: list[float] = []
        self.losses: list[float] = []
        self.curve: list[dict[str, Any]] = []
        self.reached: dict[str, Any] | None = None
        self.stopped: str | None = None
        self.init_sha256 = weights_sha256(model)
        self._new_epoch()
        self.order_sha256 = hashlib.sha256(torch.cat(self.batches).numpy().tobytes()).hexdigest()
        self.probe_loss: float | None = None

    @torch.no_grad()
    def probe(self, train_data: Batches) -> float:
        """The loss of the first batch through the cell applied 3 times (the model's
        ``mode="unrolled"``, no DEQ layer) with the first step's dropout masks: the same number
        bit for bit for every method of a seed when weights, data order and masks agree. The
        BatchNorm statistics it touches are restored (untimed)."""
        model = self.model
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        x, y = next(iter(train_data.iterate([self.batches[0]], torch.device("cpu"), torch.float32)))
        model.train()
        gen = torch.Generator().manual_seed(seed_of(self.seed, 0, 0, 0))
        if self.cfg.data.augment:
            x = augment(x, self.cfg, gen)
        out = model(x, mode="unrolled", unrolled_steps=3, generator=gen)
        self.probe_loss = float(F.cross_entropy(out.logits.float(), y))
        model.load_state_dict(saved)
        return self.probe_loss

    def _new_epoch(self) -> None:
        order = epoch_permutation(self.n_train, self.seed, self.epoch)
        self.batches = shard_batches(
            order, self.cfg.data.batch_size, DistInfo(), drop_last=self.cfg.data.drop_last
        )
        self.pos = 0

    def train_step(self, train_data: Batches) -> None:
        """One training step (timed: wall and process CPU)."""
        cfg, model = self.cfg, self.model
        t0, c0 = time.perf_counter(), time.process_time()
        if self.pos == len(self.batches):
            self.epoch += 1
            self._new_epoch()
        i, idx = self.pos, self.batches[self.pos]
        x, y = next(iter(train_data.iterate([idx], torch.device("cpu"), torch.float32)))
        model.train()
        torch.manual_seed(seed_of(self.seed, self.epoch, i, 0, 1))
        gen = torch.Generator().manual_seed(seed_of(self.seed, self.epoch, i, 0))
        if cfg.data.augment:
            x = augment(x, cfg, gen)
        out = model(x, mode="deq", generator=gen)
        loss = F.cross_entropy(out.logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = grad_norm(self.params)
        if cfg.optim.grad_clip > 0 and math.isfinite(float(norm)):
            torch.nn.utils.clip_grads_with_norm_(self.params, cfg.optim.grad_clip, norm)
        self.schedule.set_step(self.step)
        self.optimizer.step()
        self.step += 1
        self.pos += 1
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        self.train_s += dt
        self.cpu_s += dc
        self.step_times.append(dt)
        self.step_cpu.append(dc)
        self.losses.append(float(loss.detach()))
        if out.info is not None:
            self.fwd_nsteps.append(float(out.info.nstep.float().mean()))
        if not math.isfinite(self.losses[-1]):
            self.stopped = "non-finite loss"

    def check(self, train_ds: Any, test_ds: Any, target: float, *, at_cap: bool) -> float:
        """Precise BatchNorm and the test pass (timed apart); records the point and whether
        the target is reached. Returns the test accuracy."""
        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        recalibrate_batchnorm(
            self.model,
            train_ds,
            batches=cfg.train.bn_recalibration_batches,
            batch_size=cfg.data.batch_size,
        )
        rec = evaluate(self.model, test_ds, batch_size=cfg.data.eval_batch_size)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        self.eval_s += dt
        acc = float(rec["test_acc"])
        point = {
            "step": self.step,
            "epoch": self.step / len(self.batches),
            "train_s": self.train_s,
            "cpu_s": self.cpu_s,
            "test_acc": acc,
            "test_loss": float(rec["test_loss"]),
            "test_fwd_nstep": float(rec["test_fwd_nstep"]),
            "test_n": int(rec["test_n"]),
            "eval_s": dt,
            "eval_cpu_s": dc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "at_cap": at_cap,
            "load": loadavg(),
        }
        self.curve.append(point)
        if acc >= target and self.reached is None:
            self.reached = {k: point[k] for k in ("step", "train_s", "cpu_s", "test_acc")}
            self.stopped = "target"
        return acc

    def side_by_side(self, steps: int) -> dict[str, Any]:
        """Step cost over steps 2..``steps``: the steps during which every method of the seed
        was still training, one step each in turn, so all of them ran under the same load
        (after a method stops, the others run on under whatever load follows)."""
        times, cpu = self.step_times[1:steps], self.step_cpu[1:steps]
        return {
            "steps": len(times),
            "step_time_median_s": statistics.median(times) if times else None,
            "step_time_mean_s": statistics.fmean(times) if times else None,
            "cpu_per_step_s": statistics.fmean(cpu) if cpu else None,
        }

    def record(self, common_steps: int) -> dict[str, Any]:
        library, estimator = METHODS[self.method]
        times = self.step_times[1:] or self.step_times  # the first step warms caches up
        return {
            "method": self.method,
            "library": library,
            "estimator": estimator,
            "seed": self.seed,
            "init_sha256": self.init_sha256,
            "order_sha256": self.order_sha256,
            "probe_loss": self.probe_loss,
            "first_loss": self.losses[0] if self.losses else None,
            "reached": self.reached is not None,
            "steps_to_target": None if self.reached is None else self.reached["step"],
            "train_s_to_target": None if self.reached is None else self.reached["train_s"],
            "cpu_s_to_target": None if self.reached is None else self.reached["cpu_s"],
            "result": "reached"
            if self.reached is not None
            else f"not reached within cap ({self.stopped})",
            "stopped": self.stopped,
            "steps": self.step,
            "train_s": self.train_s,
            "cpu_s": self.cpu_s,
            "eval_s": self.eval_s,
            "side_by_side": self.side_by_side(common_steps),
            "step_time_mean_s": statistics.fmean(times) if times else None,
            "step_time_median_s": statistics.median(times) if times else None,
            "cpu_per_step_s": self.cpu_s / self.step if self.step else None,
            "fwd_nstep_mean": statistics.fmean(self.fwd_nsteps) if self.fwd_nsteps else None,
            "best_test_acc": max((p["test_acc"] for p in self.curve), default=None),
            "curve": self.curve,
        }


def run_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Every method of ``seed``, interleaved one step each in turn, until each reached the
    target or its cap."""
    torch.set_num_threads(args.threads)
    cfg = _config(args)
    train_ds, test_ds, info = load_data(cfg)
    get_deq = _import_torchdeq() if any(m.startswith("td_") for m in args.methods) else None
    seed_everything(seed)
    ref = build_model(cfg, info=info)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    steps_per_epoch = len(
        shard_batches(
            torch.arange(len(train_ds)),
            cfg.data.batch_size,
            DistInfo(),
            drop_last=cfg.data.drop_last,
        )
    )
    runs = [
        Run(
            m,
            build_method(m, cfg, info, state, get_deq),
            cfg,
            seed=seed,
            schedule_steps=steps_per_epoch * cfg.train.epochs,
            n_train=len(train_ds),
        )
        for m in args.methods
    ]
    train_data = Batches(train_ds)
    for run in runs:
        run.probe(train_data)
    cap_s = args.cap_min * 60.0
    active = list(runs)
    while active:
        for run in list(active):
            run.train_step(train_data)
            capped = run.train_s >= cap_s or (args.max_steps and run.step >= args.max_steps)
            if run.stopped is not None:  # non-finite loss
                active.remove(run)
                continue
            if run.step % args.eval_every == 0 or capped:
                acc = run.check(train_ds, test_ds, args.target, at_cap=bool(capped))
                print(
                    f"seed {seed} {run.method}: step {run.step} train {run.train_s:.0f} s "
                    f"acc {acc:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
            if run.reached is not None or capped:
                run.stopped = run.stopped or "cap"
                active.remove(run)
    common = min(r.step for r in runs)
    return [r.record(common) for r in runs]


def _config(args: argparse.Namespace) -> Config:
    sets = list(STUDY_SETS)
    if args.train_size is not None:
        sets.append(f"data.train_size={args.train_size}")
    if args.test_size is not None:
        sets.append(f"data.test_size={args.test_size}")
    return load_config(args.config, sets + list(args.sets))


# --------------------------------------------------------------------------- summary


def summarise(records: list[dict[str, Any]], cap_s: float) -> dict[str, Any]:
    """Per seed, each method's time to target over TorchDEQ's faster method's (TorchDEQ's
    faster of ``td_upg``/``td_ift`` in that seed); over the seeds, mean times and their ratio.
    A method not reached counts as the cap, and its ratio is a bound (``<`` or ``>``)."""

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> dict[str, Any]:
        if a is None or b is None:
            return {"value": None, "bound": None}
        va, vb = a[f"{key}_to_target"], b[f"{key}_to_target"]
        if va is not None and vb is not None:
            return {"value": va / vb, "bound": "="}
        if va is not None:  # b not reached: b > cap
            return {"value": va / cap_s, "bound": "<"} if key == "train_s" else _none()
        if vb is not None:
            return {"value": cap_s / vb, "bound": ">"} if key == "train_s" else _none()
        return _none()

    def _none() -> dict[str, Any]:
        return {"value": None, "bound": None}

    seeds = sorted({r["seed"] for r in records})
    per_seed = []
    for s in seeds:
        rs = {r["method"]: r for r in records if r["seed"] == s}
        tds = [rs[m] for m in ("td_upg", "td_ift") if m in rs]
        best = min(
            tds,
            key=lambda r: r["train_s_to_target"] if r["reached"] else math.inf,
            default=None,
        )
        row: dict[str, Any] = {"seed": s, "torchdeq_best": None if best is None else best["method"]}
        for m in ("pdq_upg", "pdq_ift"):
            if m in rs:
                row[f"{m}_time_ratio"] = ratio(rs[m], best, "train_s")
                row[f"{m}_cpu_ratio"] = ratio(rs[m], best, "cpu_s")
                row[f"{m}_steps_ratio"] = ratio(rs[m], best, "steps")
        per_seed.append(row)
    means: dict[str, Any] = {}
    for m in METHODS:
        rs = [r for r in records if r["method"] == m]
        if rs and all(r["reached"] for r in rs):
            means[m] = {
                "train_s_to_target": statistics.fmean(r["train_s_to_target"] for r in rs),
                "cpu_s_to_target": statistics.fmean(r["cpu_s_to_target"] for r in rs),
                "steps_to_target": statistics.fmean(r["steps_to_target"] for r in rs),
            }
    over: dict[str, Any] = {"mean_to_target": means}
    td_means = {m: means[m] for m in ("td_upg", "td_ift") if m in means}
    if td_means:
        best_m = min(td_means, key=lambda m: td_means[m]["train_s_to_target"])
        over["torchdeq_best"] = best_m
        for m in ("pdq_upg", "pdq_ift"):
            if m in means:
                over[f"{m}_time_ratio"] = (
                    means[m]["train_s_to_target"] / td_means[best_m]["train_s_to_target"]
                )
                over[f"{m}_cpu_ratio"] = (
                    means[m]["cpu_s_to_target"] / td_means[best_m]["cpu_s_to_target"]
                )
    # step cost side by side (the steps of a seed during which all its methods were running,
    # the first excluded): the median wall time of a step and the process CPU time per step,
    # phantomdeq over TorchDEQ's same estimator, averaged over the seeds
    for key, field in (
        ("step_time_median_ratio", "step_time_median_s"),
        ("cpu_per_step_ratio", "cpu_per_step_s"),
    ):
        ratios: dict[str, float] = {}
        for lib_m, td_m in (("pdq_upg", "td_upg"), ("pdq_ift", "td_ift")):
            pairs = [
                (a["side_by_side"][field], b["side_by_side"][field])
                for a in records
                for b in records
                if a["method"] == lib_m and b["method"] == td_m and a["seed"] == b["seed"]
            ]
            if pairs and all(p[0] and p[1] for p in pairs):
                ratios[f"{lib_m}_over_{td_m}"] = statistics.fmean(a / b for a, b in pairs)
        over[key] = ratios
    return {"per_seed": per_seed, "over_seeds": over}


def _fmt_ratio(r: dict[str, Any] | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    bound = "" if r["bound"] == "=" else r["bound"]
    return f"{bound}{r['value']:.2f}"


# --------------------------------------------------------------------------- CLI


def _git_head() -> str | None:
    """The commit of the script's tree (``+dirty`` with uncommitted changes), if git says."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(BASE_CONFIG), help="base config (default: %(default)s)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        dest="sets",
        metavar="KEY=VALUE",
        help="config override after the study's (repeatable), e.g. data.root=PATH",
    )
    ap.add_argument("--seeds", default="0,1", help="comma list (default %(default)s)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    ap.add_argument("--cap-min", type=float, default=20.0, help="training-clock cap per run")
    ap.add_argument("--target", type=float, default=0.98, help="test accuracy to reach")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between test checks")
    ap.add_argument("--max-steps", type=int, default=0, help="also stop a run here (0: no limit)")
    ap.add_argument("--train-size", type=int, default=None, help="seeded training subset")
    ap.add_argument("--test-size", type=int, default=None, help="seeded test subset")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once, one process each")
    ap.add_argument("--note", default="", help="a label stored in the JSON")
    ap.add_argument("--out", default="benchmarks/results/time_to_accuracy.json")
    args = ap.parse_args(argv)
    args.methods = tuple(m for m in args.methods.split(",") if m)
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        ap.error(f"--methods: unknown {bad}; allowed {list(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        ap.error(f"--seeds: a comma list of integers, got {args.seeds!r}")
    if not seeds:
        ap.error("--seeds: give at least one seed")
    for name in ("eval_every", "threads", "jobs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.cap_min <= 0 or not 0 < args.target <= 1:
        ap.error("--cap-min must be > 0 and --target in (0, 1]")
    if any(m.startswith("td_") for m in args.methods) and _import_torchdeq() is None:
        print(
            "time_to_accuracy: skipped — TorchDEQ is not importable "
            "(install the peer extra: pip install --no-deps torchdeq==0.1.0)"
        )
        return 0
    torch.set_num_threads(args.threads)
    cfg = _config(args)  # validated here, before any worker starts
    t0, c0, load0 = time.perf_counter(), time.process_time(), loadavg()
    if args.jobs > 1 and len(seeds) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=ctx) as pool:
            done = list(pool.map(run_seed, [args] * len(seeds), seeds))
    else:
        done = [run_seed(args, s) for s in seeds]
    records = [r for rs in done for r in rs]
    summary = summarise(records, args.cap_min * 60.0)
    full = (
        args.cap_min >= FULL_RUN["cap_min"]
        and args.target == FULL_RUN["target"]
        and args.eval_every == FULL_RUN["eval_every"]
        and len(seeds) >= FULL_RUN["min_seeds"]
        and args.train_size is None
        and args.test_size is None
        and not args.max_steps
        and all(s.startswith("data.root=") for s in args.sets)
        and set(args.methods) == set(METHODS)
    )

    print(
        f"\ntime to {args.target:.2%} test accuracy ({cfg.data.name}, "
        f"{'full' if args.test_size is None else args.test_size} test set), "
        f"cap {args.cap_min:g} min of training clock, check every {args.eval_every} steps, "
        f"{args.threads} thread(s), interleaved"
    )
    rows = []
    for r in records:
        ps = next(p for p in summary["per_seed"] if p["seed"] == r["seed"])
        rows.append(
            [
                r["seed"],
                r["method"],
                r["steps_to_target"] if r["reached"] else f"> {r['steps']}",
                f"{r['train_s_to_target'] / 60:.2f}" if r["reached"] else "not reached",
                f"{r['cpu_s_to_target'] / 60:.2f}" if r["reached"] else "-",
                r["side_by_side"]["step_time_median_s"] or float("nan"),
                r["side_by_side"]["cpu_per_step_s"] or float("nan"),
                r["best_test_acc"] if r["best_test_acc"] is not None else float("nan"),
                _fmt_ratio(ps.get(f"{r['method']}_time_ratio")),
            ]
        )
    print_table(
        [
            "seed",
            "method",
            "steps",
            "train min",
            "CPU min",
            "step s (median)*",
            "CPU s/step*",
            "best acc",
            "time / TorchDEQ best",
        ],
        rows,
    )
    common = {r["seed"]: r["side_by_side"]["steps"] for r in records}
    print(
        "* side by side: steps 2.. of each seed while all its methods were training "
        f"({', '.join(f'seed {k}: {v} steps' for k, v in common.items())})"
    )
    for key, what in (
        ("step_time_median_ratio", "median step time"),
        ("cpu_per_step_ratio", "CPU time per step"),
    ):
        for k, v in summary["over_seeds"][key].items():
            print(f"{what} {k.replace('_over_', ' / ')}: {v:.3f}")
    try:
        import torchdeq

        td_version = getattr(torchdeq, "__version__", "0.1.0")
    except ImportError:
        td_version = None
    payload = {
        "question": __doc__.splitlines()[0] + " " + __doc__.splitlines()[1],
        "kind": "study" if full else "smoke (not the time-to-accuracy study)",
        "note": args.note,
        "command": "python benchmarks/time_to_accuracy.py " + " ".join(sys.argv[1:])
        if argv is None
        else "main(" + repr(argv) + ")",
        "git": _git_head(),
        "schedule": "interleaved: one step of each method in turn, one process per seed",
        "machine": {**machine(), "load_before": load0, "loadavg_end": loadavg()},
        "torchdeq": td_version,
        "args": {k: v for k, v in vars(args).items()},
        "config": config_to_dict(cfg),
        "ift_backward": IFT_BACKWARD,
        "runs": records,
        "summary": summary,
        "wall_s": time.perf_counter() - t0,
        "cpu_s_main": time.process_time() - c0,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
