"""Cost of each gradient estimator for one training step (paper Table 2), as the command
``phantomdeq cost --model mdeq_tiny --out DIR``.

Setting. One training step of an MDEQ classifier on CIFAR-shaped random data (``3x32x32``,
10 classes, fixed seed): stem -> ``DEQ(F)`` -> head -> cross-entropy -> ``backward()``. Every
method shares the same weights, data, dropout masks and forward solver (``--solver``, a fixed
budget of ``--fwd-iters`` iterations with ``tol=0`` so that every method does the same forward
work); only the gradient differs:

* ``ift_<solver>``: exact implicit gradient, eq. (4), backward linear system solved by
  FixedPoint / Anderson / Broyden / GMRES / BiCGStab with a fixed budget of ``--bwd-iters``
  (20) iterations (vector-Jacobian products for the Krylov solvers);
* ``upg_k<k>``: unrolled phantom gradient ``A^unr_{k,λ}``, eq. (17), and ``upg_ckpt_k<k>`` its
  checkpointed variant (each damped step recomputed in the backward pass);
* ``npg_k<k>``: Neumann phantom gradient ``A^neu_{k,λ}``, eq. (18);
* ``onestep``: ``A = ∂F/∂θ`` (``UPG(1, 1)``);
* ``bptt``: back-propagation through the forward iterations (forward solver forced to a
  FixedPoint iteration with the same budget, the only differentiable solver);
* ``shine``: the backward from the forward Broyden solve's inverse estimate (SHINE, no
  backward solve; forward solver forced to Broyden with the same budget when ``--solver`` is
  another one).

Measured per method: forward-solve time (the solver call alone), forward time (stem, solve,
gradient attachment, head, loss), backward time, step time (forward + backward), the memory held
by the autograd graph at the end of the forward pass ("Mem" in Table 2) and the peak memory of the
step ("Peak Mem"), both relative to the memory live before the step. Times are medians over
``--repeats`` steps after ``--warmup`` steps, methods alternating (the order rotates each round).

Memory. On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (allocator
peak, every timed repeat). On CPU there is no allocator peak counter, so one extra step per method
runs under ``torch.profiler`` with ``profile_memory=True``: every allocation and free of the CPU
allocator is recorded with its byte count and timestamp; summing them in time order gives the
live bytes allocated since the step started, whose maximum is the peak (see BENCHMARKS.md).

Execution modes (``--modes``, side by side in one run, the rounds alternating over every
method x mode): ``eager``; ``compile`` -- the DEQ, head and loss through ``torch.compile`` (the
forward solve is traced into the graph, so no solve time is reported); ``graph`` (CUDA) -- the
forward solve replayed from a CUDA graph (``DEQ(cuda_graph=True)``). Ratios to the reference
method are taken within each mode.

The method list is derived from the estimator registry (``pdq.grad.ESTIMATORS`` and
``pdq.grad.options``, :func:`method_specs`): an estimator with a ``solver`` option gets one
method per backward solver class, one with ``k`` one per ``--ks`` value (and a checkpointed one
when it has ``checkpoint``), any other one method. :class:`CostConfig` holds the options of
:func:`run`; the command's flags are its fields (``--fwd-iters`` for ``fwd_iters`` ...).
Outputs in ``--out``: ``cost.json`` (configuration, machine, records), ``cost.png`` (step time
and peak memory vs k per method, :mod:`.report`); the Table-2-style table with ratios to the
reference IFT on stdout. The measuring tools are in :mod:`.measure`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

import phantomdeq as pdq
from phantomdeq.train.distributed import seed_of

from .command import (
    Outputs,
    Parser,
    UsageError,
    add_flags,
    config_from_flags,
    int_list,
    run_command,
    word_list,
)
from .measure import Clock, cpu_peak_memory, machine, timed_solver

__all__ = [
    "BACKWARD_SOLVERS",
    "COMPLEXITY",
    "EXEC_MODES",
    "SOLVERS",
    "CostConfig",
    "MethodSpec",
    "build_parser",
    "main",
    "method_specs",
    "run",
]

PROG = "phantomdeq cost"

# --------------------------------------------------------------------------- methods and options

#: Paper Table 2: (time, memory, peak memory) complexity per family; T >> t ≈ 1.
COMPLEXITY: dict[str, tuple[str, str, str]] = {
    "ift": ("O(T)", "O(1)", "O(t)"),
    "upg": ("O(t)", "O(t)", "O(1)"),
    "upg_ckpt": ("O(t)", "O(1)", "O(1)"),
    "npg": ("O(t)", "O(1)", "O(t)"),
    "onestep": ("O(1)", "O(1)", "O(1)"),
    "bptt": ("O(N)", "O(N)", "O(N)"),
    # SHINE: no backward solve; the forward Broyden factors (about one state per forward
    # iteration) are held until the backward pass
    "shine": ("O(1)", "O(T)", "O(T)"),
}
SOLVERS = tuple(pdq.solvers.SOLVERS)
#: the IFT methods: one per solver of the backward system (fixed-point and Krylov)
BACKWARD_SOLVERS = tuple(pdq.solvers.BACKWARD_SOLVERS)
EXEC_MODES = ("eager", "compile", "graph")


@dataclass(frozen=True)
class MethodSpec:
    """One gradient estimator of the cost table: ``estimator`` (its registry name) with the
    options ``k``, ``checkpoint`` and ``backward_solver`` where it declares them."""

    name: str
    family: str  # key of COMPLEXITY
    label: str
    estimator: str
    k: int | None = None
    backward_solver: str | None = None
    checkpoint: bool = False

    def make(self, cfg: CostConfig) -> pdq.GradientEstimator:
        declared = pdq.grad.options(self.estimator)
        opts: dict[str, Any] = {}
        if self.backward_solver is not None:
            opts["solver"] = pdq.solvers.from_name(
                self.backward_solver, max_iter=cfg.bwd_iters, tol=0.0
            )
        if "warn_unconverged" in declared:  # a fixed budget (tol 0) never converges by design
            opts["warn_unconverged"] = False
        if self.k is not None:
            opts["k"] = self.k
        if "lam" in declared:
            opts["lam"] = cfg.lam
        if self.checkpoint:
            opts["checkpoint"] = True
        return pdq.grad.from_name(self.estimator, **opts)

    @property
    def tracks_forward(self) -> bool:
        """Back-propagates through the forward solver (BPTT): needs a FixedPoint forward."""
        return bool(pdq.grad.ESTIMATORS[self.estimator].tracks_forward)

    @property
    def needs_forward_inverse(self) -> bool:
        """Reuses the forward Broyden inverse estimate (SHINE): needs a Broyden forward."""
        return bool(pdq.grad.ESTIMATORS[self.estimator].needs_forward_inverse)

    def forward_solver(self, cfg: CostConfig) -> str:
        """The forward solver this method runs with."""
        if self.tracks_forward:
            return "fixed_point"
        if self.needs_forward_inverse and cfg.solver != "broyden":
            return "broyden"
        return cfg.solver


def method_specs(ks: Sequence[int] = (1, 3, 5, 9)) -> list[MethodSpec]:
    """Every method of the table, in registry order (see the module docstring)."""
    specs: list[MethodSpec] = []
    for name, cls in pdq.grad.ESTIMATORS.items():
        declared, label = pdq.grad.options(name), cls.__name__
        if "solver" in declared:
            for s in BACKWARD_SOLVERS:
                specs.append(MethodSpec(f"{name}_{s}", name, f"{label} ({s})", name, None, s))
        elif "k" in declared:
            specs += [MethodSpec(f"{name}_k{k}", name, f"{label} k={k}", name, k) for k in ks]
            if "checkpoint" in declared:
                specs += [
                    MethodSpec(
                        f"{name}_ckpt_k{k}",
                        f"{name}_ckpt",
                        f"{label}-ckpt k={k}",
                        name,
                        k,
                        checkpoint=True,
                    )
                    for k in ks
                ]
        else:
            specs.append(MethodSpec(name, name, label, name))
    return specs


def _model_name(value: str) -> str:
    from phantomdeq.models import MDEQ_CONFIG_NAMES

    if value not in MDEQ_CONFIG_NAMES:
        raise ValueError(f"must be one of {', '.join(MDEQ_CONFIG_NAMES)}")
    return value


_LIST = Field(min_length=1, strict=False)


@pydantic.dataclasses.dataclass(
    frozen=True, config=pydantic.ConfigDict(strict=True, allow_inf_nan=False)
)
class CostConfig:
    """Options of :func:`run` (the CLI flags); a refused value raises ``ValueError`` naming
    the field."""

    model: Annotated[str, pydantic.AfterValidator(_model_name)] = "mdeq_tiny"
    batch: PositiveInt = 64
    device: Literal["cpu", "cuda"] = "cpu"
    solver: Literal[SOLVERS] = "anderson"  # type: ignore[valid-type]
    fwd_iters: Annotated[int, Field(ge=2)] = 22
    bwd_iters: Annotated[int, Field(ge=2)] = 20
    ks: Annotated[tuple[PositiveInt, ...], _LIST] = (1, 3, 5, 9)
    lam: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    repeats: PositiveInt = 5
    warmup: Annotated[int, Field(ge=0)] = 1
    amp: Literal["none", "bf16"] = "none"
    seed: int = 0
    image_size: Annotated[int, Field(ge=4)] = 32
    num_classes: Annotated[int, Field(ge=2)] = 10
    methods: Annotated[tuple[str, ...], _LIST] | None = None  # None: all
    reference: str = "ift_broyden"
    memory: bool = True
    modes: Annotated[tuple[str, ...], _LIST] = ("eager",)

    @pydantic.model_validator(mode="after")
    def _known_methods(self) -> CostConfig:
        names = [m.name for m in method_specs(self.ks)]
        unknown = [m for m in self.methods or () if m not in names]
        if unknown:
            raise ValueError(f"methods: unknown method(s) {unknown}; allowed: {', '.join(names)}")
        if self.reference not in names:
            raise ValueError(f"reference must be one of {names}, got {self.reference!r}")
        bad = [m for m in self.modes if m not in EXEC_MODES]
        if bad or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct entries of {EXEC_MODES}, got {self.modes!r}")
        if "graph" in self.modes and self.device != "cuda":
            raise ValueError("modes: 'graph' (CUDA graphs) needs device='cuda'")
        return self


# --------------------------------------------------------------------------- the experiment


def _autocast(cfg: CostConfig) -> contextlib.AbstractContextManager[Any]:
    if cfg.amp == "bf16":
        return torch.autocast(cfg.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _TimedGraphs:
    """A DEQ's captured-solve cache with the marks ``solve_start``/``solve_end`` around each
    replayed solve (graph mode)."""

    def __init__(self, graphs: Any, clock: Any) -> None:
        self.graphs = graphs
        self.clock = clock

    def supports(self, device: torch.device) -> bool:
        return bool(self.graphs.supports(device))

    @property
    def backend(self) -> Any:
        return self.graphs.backend

    def __call__(self, *args: Any) -> Any:
        self.clock.mark("solve_start")
        sol = self.graphs(*args)
        self.clock.mark("solve_end")
        return sol


class _Bench:
    """Model, data and one DEQ per method; ``step(name, clock, mode)`` runs one training step."""

    def __init__(self, cfg: CostConfig) -> None:
        from phantomdeq.models import build_model

        self.cfg = cfg
        self.dev = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        fwd = pdq.solvers.SOLVERS[cfg.solver](max_iter=cfg.fwd_iters, tol=0.0)
        self.model = build_model(
            cfg.model, num_classes=cfg.num_classes, in_channels=3, solver=fwd, grad=pdq.OneStep()
        ).to(self.dev)
        self.model.train()
        gen = torch.Generator().manual_seed(seed_of(cfg.seed, 1))
        x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
        y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=gen)
        self.x, self.y = x.to(self.dev), y.to(self.dev)
        cell: nn.Module = self.model.f
        if cfg.amp == "bf16":
            cell = pdq.AutocastCell(cell, dtype=torch.bfloat16, device_type=cfg.device)
        self.cell = cell
        self.specs = {m.name: m for m in method_specs(cfg.ks)}
        self.fwd_solver = fwd
        self.bptt_solver = pdq.FixedPoint(max_iter=cfg.fwd_iters, tol=0.0)
        # SHINE's forward: the configured solver when it is Broyden, else Broyden, same budget
        self.inverse_solver = (
            fwd if cfg.solver == "broyden" else pdq.Broyden(max_iter=cfg.fwd_iters, tol=0.0)
        )
        self.estimators = {name: spec.make(cfg) for name, spec in self.specs.items()}
        self.last_info: dict[str, Any] = {}
        self._graphed: dict[str, pdq.DEQ] = {}
        self._compiled: dict[str, Callable[..., Any]] = {}

    def supports(self, name: str, mode: str) -> bool:
        """BPTT records its forward iteration and SHINE needs the forward inverse estimate:
        no captured solve."""
        spec = self.specs[name]
        return not (mode == "graph" and (spec.tracks_forward or spec.needs_forward_inverse))

    def _inputs(self) -> tuple[Any, torch.Tensor]:
        cfg, model = self.cfg, self.model
        with _autocast(cfg):
            inj = model.stem(self.x)
        inj = inj.float()
        z0 = model.initial_state(inj)
        model.f.reset(z0, generator=torch.Generator().manual_seed(seed_of(cfg.seed, 2)))
        return z0, inj

    def _head_loss(self, z: Any) -> torch.Tensor:
        with _autocast(self.cfg):
            logits = self.model.head(z if isinstance(z, tuple) else (z,))
        return F.cross_entropy(logits.float(), self.y)

    def _compiled_step(self, name: str, solver: Any) -> Callable[..., Any]:
        fn = self._compiled.get(name)
        if fn is None:
            deq = pdq.DEQ(self.cell, solver=solver, grad=self.estimators[name])

            def core(z0: Any, inj: torch.Tensor, deq: pdq.DEQ = deq) -> Any:
                z, info = deq(z0, inj)
                return self._head_loss(z), info

            fn = self._compiled[name] = torch.compile(core)
        return fn

    def _graphed_forward(self, name: str, solver: Any, clock: Any, z0: Any, inj: Any) -> Any:
        deq = self._graphed.get(name)
        if deq is None:
            deq = self._graphed[name] = pdq.DEQ(
                self.cell, solver=solver, grad=self.estimators[name], cuda_graph=True
            )
        graphs = deq._graphs
        deq._graphs = _TimedGraphs(graphs, clock)  # type: ignore[assignment]
        try:
            return deq(z0, inj)
        finally:
            deq._graphs = graphs

    def solver_for(self, spec: MethodSpec) -> Any:
        """The forward solver of a method (see :meth:`MethodSpec.forward_solver`)."""
        if spec.tracks_forward:
            return self.bptt_solver
        if spec.needs_forward_inverse:
            return self.inverse_solver
        return self.fwd_solver

    def step(self, name: str, clock: Any, mode: str = "eager") -> float:
        spec = self.specs[name]
        solver = self.solver_for(spec)
        self.model.zero_grad(set_to_none=True)
        clock.mark("start")
        z0, inj = self._inputs()
        if mode == "compile":
            loss, info = self._compiled_step(name, solver)(z0, inj)
        else:
            if mode == "graph":
                z, info = self._graphed_forward(name, solver, clock, z0, inj)
            else:
                deq = pdq.DEQ(
                    self.cell, solver=timed_solver(solver, clock), grad=self.estimators[name]
                )
                z, info = deq(z0, inj)
            loss = self._head_loss(z)
        clock.mark("fwd_end")
        loss.backward()
        clock.mark("bwd_end")
        self.last_info[f"{name}@{mode}"] = info
        return float(loss.detach())


_TIMES = ("solve_ms", "forward_ms", "backward_ms", "step_ms")


def run(
    cfg: CostConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Measure every selected method (see the module docstring); returns one record per method.

    Each record holds the configuration, the per-repeat samples and their medians
    (``solve_ms``, ``forward_ms``, ``backward_ms``, ``step_ms``), the memory figures
    (``graph_mb``, ``peak_mb``, ``memory_method``) and the ratios to ``cfg.reference``
    (``step_ratio`` = reference step time / this step time, i.e. the speed-up; ``peak_ratio`` =
    this peak / reference peak).
    """
    if cfg is None:
        cfg = CostConfig(**overrides)
    elif overrides:
        cfg = CostConfig(**{**asdict(cfg), **overrides})
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("CostConfig.device='cuda' but torch.cuda.is_available() is False")
    say = progress or (lambda s: None)
    bench = _Bench(cfg)
    methods = [n for n in bench.specs if cfg.methods is None or n in cfg.methods]
    if cfg.reference not in methods:
        methods.insert(0, cfg.reference)
    # one entry per method x mode, "name@mode"
    names = [f"{n}@{m}" for m in cfg.modes for n in methods if bench.supports(n, m)]
    samples: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in (*_TIMES, "peak_mb", "graph_mb")} for n in names
    }
    losses = _time_steps(bench, names, samples, say)
    cuda = bench.dev.type == "cuda"
    if cfg.memory:
        (_cuda_graph_memory if cuda else _cpu_memory)(bench, names, samples, say)
    memory_method = "cuda_max_memory_allocated" if cuda else "profiler_cpu_allocator_events"
    records = [
        _record(bench, name, samples[name], losses, memory_method if cfg.memory or cuda else None)
        for name in names
    ]
    _add_ratios(records, cfg.reference)
    return records


def _time_steps(
    bench: _Bench,
    names: list[str],
    samples: dict[str, dict[str, list[float]]],
    say: Callable[[str], None],
) -> dict[str, float]:
    """``warmup + repeats`` rounds of one step per method (the order rotates each round)."""
    cfg, cuda = bench.cfg, bench.dev.type == "cuda"
    losses: dict[str, float] = {}
    total = cfg.warmup + cfg.repeats
    for r in range(total):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            clock = Clock(bench.dev)
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            method, mode = name.split("@")
            losses[name] = bench.step(method, clock, mode)
            if cuda:
                torch.cuda.synchronize()
            if r < cfg.warmup:
                continue
            s = samples[name]
            for key, (a, b) in zip(_TIMES, _SPANS):
                s[key].append(clock.ms(a, b))
            if cuda:
                s["peak_mb"].append((torch.cuda.max_memory_allocated() - base) / 2**20)
        say(f"round {r + 1}/{total} done" + (" (warm-up)" if r < cfg.warmup else ""))
    return losses


_SPANS = (
    ("solve_start", "solve_end"),
    ("start", "fwd_end"),
    ("fwd_end", "bwd_end"),
    ("start", "bwd_end"),
)


def _cpu_memory(
    bench: _Bench,
    names: list[str],
    samples: dict[str, dict[str, list[float]]],
    say: Callable[[str], None],
) -> None:
    """One extra step per method under the profiler: peak and graph memory on CPU."""
    for name in names:
        clock = Clock(bench.dev, profile_marks=True)
        method, mode = name.split("@")
        prof = cpu_peak_memory(
            lambda m=method, c=clock, md=mode: bench.step(m, c, md),  # type: ignore[misc]
            marks=("fwd_end",),
        )
        samples[name]["peak_mb"].append(prof.peak_bytes / 2**20)
        samples[name]["graph_mb"].append(prof.at_marks.get("fwd_end", 0) / 2**20)
        say(f"memory {name}: peak {prof.peak_bytes / 2**20:.1f} MiB")


def _cuda_graph_memory(
    bench: _Bench,
    names: list[str],
    samples: dict[str, dict[str, list[float]]],
    say: Callable[[str], None],
) -> None:
    """Graph memory at the end of the forward pass on CUDA: one extra step per method."""
    for name in names:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        hold: dict[str, int] = {}

        class _MemClock(Clock):
            def mark(self, mark_name: str, hold: dict[str, int] = hold) -> None:
                super().mark(mark_name)
                if mark_name == "fwd_end":
                    hold["fwd_end"] = torch.cuda.memory_allocated()

        method, mode = name.split("@")
        bench.step(method, _MemClock(bench.dev), mode)
        samples[name]["graph_mb"].append((hold.get("fwd_end", base) - base) / 2**20)


def _record(
    bench: _Bench,
    name: str,
    s: dict[str, list[float]],
    losses: dict[str, float],
    memory_method: str | None,
) -> dict[str, Any]:
    method, mode = name.split("@")
    cfg, spec = bench.cfg, bench.specs[method]
    info = bench.last_info.get(name)
    rec: dict[str, Any] = {
        "method": method,
        "mode": mode,
        "label": spec.label,
        "family": spec.family,
        "k": spec.k,
        "lam": cfg.lam if "lam" in pdq.grad.options(spec.estimator) else None,
        "backward_solver": spec.backward_solver,
        "bwd_iters": cfg.bwd_iters if spec.backward_solver is not None else None,
        "forward_solver": spec.forward_solver(cfg),
        "fwd_iters": cfg.fwd_iters,
        "model": cfg.model,
        "batch": cfg.batch,
        "device": cfg.device,
        "amp": cfg.amp,
        "complexity": dict(
            zip(("time", "mem", "peak_mem"), COMPLEXITY.get(spec.family, ("?", "?", "?")))
        ),
        "loss": losses.get(name),
        "forward_rel_residual": None if info is None else float(info.rel_residual.float().mean()),
        "memory_method": memory_method,
        "samples": s,
    }
    for key in _TIMES:
        rec[key] = statistics.median(s[key]) if s[key] else math.nan
        rec[key.replace("_ms", "_min_ms")] = min(s[key]) if s[key] else math.nan
    rec["peak_mb"] = max(s["peak_mb"]) if s["peak_mb"] else None
    rec["graph_mb"] = max(s["graph_mb"]) if s["graph_mb"] else None
    return rec


def _add_ratios(records: list[dict[str, Any]], reference: str) -> None:
    refs = {r["mode"]: r for r in records if r["method"] == reference}
    for rec in records:
        ref = refs[rec["mode"]]
        rec["reference"] = reference
        rec["step_ratio"] = ref["step_ms"] / rec["step_ms"] if rec["step_ms"] else None
        # the fastest repeat is the least disturbed by other processes on a shared machine
        rec["step_ratio_min"] = (
            ref["step_min_ms"] / rec["step_min_ms"] if rec["step_min_ms"] else None
        )
        rec["backward_ratio"] = (
            ref["backward_ms"] / rec["backward_ms"] if rec["backward_ms"] else None
        )
        rec["peak_ratio"] = (
            rec["peak_mb"] / ref["peak_mb"]
            if rec["peak_mb"] is not None and ref["peak_mb"]
            else None
        )


# --------------------------------------------------------------------------- command

#: flag -> (type, help); defaults and allowed values come from CostConfig
_FLAGS: dict[str, tuple[Any, str]] = {
    "model": (str, "MDEQ configuration (mdeq_tiny, mdeq_cifar10m, ...)"),
    "batch": (int, "batch size"),
    "device": (str, "cpu or cuda"),
    "solver": (str, "forward solver"),
    "fwd_iters": (int, "forward solver budget (tol=0)"),
    "bwd_iters": (int, "IFT backward solver budget (tol=0)"),
    "ks": (int_list, "k values of UPG/NPG, e.g. 1,3,5,9"),
    "lam": (float, "damping λ of UPG/NPG, in (0, 1]"),
    "repeats": (int, "timed steps per method"),
    "warmup": (int, "untimed steps per method first"),
    "amp": (str, "none, or bf16: autocast f, stem and head"),
    "seed": (int, "seed of weights and data"),
    "methods": (
        word_list,
        "comma-separated subset of methods (default: all), e.g. ift_broyden,upg_k5",
    ),
    "reference": (str, "method the ratios are taken against"),
    "modes": (
        word_list,
        "comma list of execution modes timed side by side: eager, compile, graph (CUDA)",
    ),
}


def build_parser() -> Parser:
    p = Parser(
        PROG, "Paper Table 2: time and peak memory of one training step per gradient estimator."
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (cost.json, cost.png)")
    add_flags(p, _FLAGS, CostConfig())
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test setting: batch 2, 1 repeat, no warm-up, 2 forward / 2 backward iterations",
    )
    return p


def _command(args: argparse.Namespace, argv: list[str]) -> int:
    from .report import cost_plot, cost_table

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    opts: dict[str, Any] = {name: getattr(args, name) for name in _FLAGS}
    opts["memory"] = not args.no_memory
    if args.quick:
        opts.update(batch=2, repeats=1, warmup=0, fwd_iters=2, bwd_iters=2)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available (allowed here: cpu)")
    cfg = config_from_flags(CostConfig, **opts)
    outputs = Outputs(args.out)
    before = machine()
    print(
        f"{PROG}: {cfg.model} batch {cfg.batch} {cfg.device} amp={cfg.amp}; load {before['loadavg']}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    records = run(cfg, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    payload = {
        "config": asdict(cfg),
        "argv": argv,
        "machine": before,
        "loadavg_after": machine()["loadavg"],
        "wall_s": wall,
        "records": records,
    }
    outputs.json("cost.json", payload)
    print(cost_table(records))
    # a bare GPU box may lack matplotlib (the `plots` extra): cost.png is then left out
    outputs.figure("cost.png", lambda path: cost_plot(records, path))
    outputs.report(f"({wall:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``phantomdeq cost``: returns 0 on success, 2 for invalid options."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(build_parser(), lambda ns: _command(ns, args), args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
