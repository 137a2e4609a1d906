"""Cost of each gradient estimator for one training step (paper Table 2), as the command
``phantomdeq cost --model mdeq_tiny --out DIR``.

Setting. One training step of an MDEQ classifier on CIFAR-shaped random data (``3x32x32``,
10 classes, fixed seed): stem -> ``DEQ(F)`` -> head -> cross-entropy -> ``backward()``. Every
method shares the same weights, data, dropout masks and forward solver (``--solver``, a fixed
budget of ``--fwd-iters`` iterations with ``tol=0`` so that every method does the same forward
work); only the gradient differs:

* ``ift_<solver>``: exact implicit gradient, eq. (4), backward linear system solved by
  FixedPoint / Anderson / Broyden with a fixed budget of ``--bwd-iters`` (20) iterations;
* ``upg_k<k>``: unrolled phantom gradient ``A^unr_{k,λ}``, eq. (17), and ``upg_ckpt_k<k>`` its
  checkpointed variant (each damped step recomputed in the backward pass);
* ``npg_k<k>``: Neumann phantom gradient ``A^neu_{k,λ}``, eq. (18);
* ``onestep``: ``A = ∂F/∂θ`` (``UPG(1, 1)``);
* ``bptt``: back-propagation through the forward iterations (forward solver forced to a
  FixedPoint iteration with the same budget, the only differentiable solver).

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

Outputs in ``--out``: ``cost.json`` (configuration, machine, records), ``cost.png`` (step time
and peak memory vs k per method); the Table-2-style table with ratios to the reference IFT on
stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import phantomdeq as pdq

__all__ = [
    "COMPLEXITY",
    "CostConfig",
    "MethodSpec",
    "cpu_peak_memory",
    "format_table",
    "main",
    "method_specs",
    "run",
    "timed_solver",
    "write_plot",
]

#: Paper Table 2: (time, memory, peak memory) complexity per family; T >> t ≈ 1.
COMPLEXITY: dict[str, tuple[str, str, str]] = {
    "ift": ("O(T)", "O(1)", "O(t)"),
    "upg": ("O(t)", "O(t)", "O(1)"),
    "upg_ckpt": ("O(t)", "O(1)", "O(1)"),
    "npg": ("O(t)", "O(1)", "O(t)"),
    "onestep": ("O(1)", "O(1)", "O(1)"),
    "bptt": ("O(N)", "O(N)", "O(N)"),
}

FORWARD_SOLVERS = ("fixed_point", "anderson", "broyden")
AMP_MODES = ("none", "bf16")
EXEC_MODES = ("eager", "compile", "graph")
DEVICES = ("cpu", "cuda")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class MethodSpec:
    """One gradient estimator of the cost table."""

    name: str
    family: str  # key of COMPLEXITY
    label: str
    k: int | None = None
    backward_solver: str | None = None

    def make(self, cfg: CostConfig) -> pdq.GradientEstimator:
        if self.family == "ift":
            if self.backward_solver is None:
                raise ValueError(f"MethodSpec {self.name!r}: an IFT method needs backward_solver")
            solver = pdq.solvers.from_name(self.backward_solver, max_iter=cfg.bwd_iters, tol=0.0)
            # a fixed budget (tol 0) never converges by design: no warning
            return pdq.IFT(solver=solver, warn_unconverged=False)
        if self.family == "upg":
            return pdq.UPG(k=int(self.k or 1), lam=cfg.lam)
        if self.family == "upg_ckpt":
            return pdq.UPG(k=int(self.k or 1), lam=cfg.lam, checkpoint=True)
        if self.family == "npg":
            return pdq.NPG(k=int(self.k or 1), lam=cfg.lam)
        if self.family == "onestep":
            return pdq.OneStep()
        if self.family == "bptt":
            return pdq.BPTT()
        raise ValueError(
            f"MethodSpec.family must be one of {tuple(COMPLEXITY)}, got {self.family!r}"
        )


@dataclass(frozen=True)
class CostConfig:
    """Options of :func:`run` (the CLI flags, validated here)."""

    model: str = "mdeq_tiny"
    batch: int = 64
    device: str = "cpu"
    solver: str = "anderson"
    fwd_iters: int = 22
    bwd_iters: int = 20
    ks: tuple[int, ...] = (1, 3, 5, 9)
    lam: float = 0.5
    repeats: int = 5
    warmup: int = 1
    amp: str = "none"
    seed: int = 0
    image_size: int = 32
    num_classes: int = 10
    methods: tuple[str, ...] | None = None  # None: all
    reference: str = "ift_broyden"
    memory: bool = True
    modes: tuple[str, ...] = ("eager",)

    def __post_init__(self) -> None:
        from phantomdeq.models import MDEQ_CONFIG_NAMES

        if self.model not in MDEQ_CONFIG_NAMES:
            raise ValueError(
                f"CostConfig.model must be one of {MDEQ_CONFIG_NAMES}, got {self.model!r}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"CostConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.solver not in FORWARD_SOLVERS:
            raise ValueError(
                f"CostConfig.solver must be one of {FORWARD_SOLVERS}, got {self.solver!r}"
            )
        if self.amp not in AMP_MODES:
            raise ValueError(f"CostConfig.amp must be one of {AMP_MODES}, got {self.amp!r}")
        for name, low in (
            ("batch", 1),
            ("fwd_iters", 2),
            ("bwd_iters", 2),
            ("repeats", 1),
            ("warmup", 0),
            ("image_size", 4),
            ("num_classes", 2),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"CostConfig.{name} must be an integer >= {low}, got {v!r}")
        if not self.ks or any(
            isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks
        ):
            raise ValueError(
                f"CostConfig.ks must be a non-empty tuple of integers >= 1, got {self.ks!r}"
            )
        if not (isinstance(self.lam, int | float) and 0.0 < float(self.lam) <= 1.0):
            raise ValueError(f"CostConfig.lam must be in (0, 1], got {self.lam!r}")
        names = [m.name for m in method_specs(self.ks)]
        if self.methods is not None:
            unknown = [m for m in self.methods if m not in names]
            if unknown or not self.methods:
                raise ValueError(
                    f"CostConfig.methods: unknown method(s) {unknown}; allowed: {', '.join(names)}"
                )
        if self.reference not in names:
            raise ValueError(f"CostConfig.reference must be one of {names}, got {self.reference!r}")
        bad = [m for m in self.modes if m not in EXEC_MODES]
        if bad or not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(
                f"CostConfig.modes must be distinct entries of {EXEC_MODES}, got {self.modes!r}"
            )
        if "graph" in self.modes and self.device != "cuda":
            raise ValueError("CostConfig.modes: 'graph' (CUDA graphs) needs device='cuda'")


def method_specs(ks: Sequence[int] = (1, 3, 5, 9)) -> list[MethodSpec]:
    """Every method of the table, in display order."""
    specs = [
        MethodSpec(f"ift_{s}", "ift", f"IFT ({s})", backward_solver=s) for s in FORWARD_SOLVERS
    ]
    specs += [MethodSpec(f"upg_k{k}", "upg", f"UPG k={k}", k=k) for k in ks]
    specs += [MethodSpec(f"upg_ckpt_k{k}", "upg_ckpt", f"UPG-ckpt k={k}", k=k) for k in ks]
    specs += [MethodSpec(f"npg_k{k}", "npg", f"NPG k={k}", k=k) for k in ks]
    specs += [MethodSpec("onestep", "onestep", "OneStep", k=1), MethodSpec("bptt", "bptt", "BPTT")]
    return specs


# --------------------------------------------------------------------------- measurement tools


class _Clock:
    """Named time marks: ``perf_counter`` on CPU, CUDA events on GPU (no extra host syncs)."""

    def __init__(self, device: torch.device, *, profile_marks: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.profile_marks = profile_marks
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.profile_marks:  # an empty profiler range: its timestamp locates the mark
            with torch.profiler.record_function(f"phantomdeq.mark.{name}"):
                pass
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[name] = ev
        else:
            self.marks[name] = time.perf_counter()

    def ms(self, a: str, b: str) -> float:
        if a not in self.marks or b not in self.marks:
            return math.nan
        if self.cuda:
            return float(self.marks[a].elapsed_time(self.marks[b]))
        return (self.marks[b] - self.marks[a]) * 1e3


class _TimedSolver:
    """``solver`` with the marks ``solve_start``/``solve_end`` set on ``clock`` around each call
    (a wrapper conforming to the :class:`phantomdeq.Solver` protocol)."""

    def __init__(self, solver: pdq.Solver, clock: Any) -> None:
        self.solver = solver
        self.clock = clock

    def __call__(self, g: Any, z0: Any) -> pdq.Solution:
        self.clock.mark("solve_start")
        sol = self.solver(g, z0)
        self.clock.mark("solve_end")
        return sol

    def __repr__(self) -> str:
        return f"timed({self.solver!r})"


class _TimedUnrollingSolver(_TimedSolver):
    """:class:`_TimedSolver` of a solver that also unrolls (BPTT's forward)."""

    def unroll(self, g: Any, z0: Any) -> tuple[Any, pdq.Solution]:
        self.clock.mark("solve_start")
        out = self.solver.unroll(g, z0)  # type: ignore[attr-defined]
        self.clock.mark("solve_end")
        return out  # type: ignore[no-any-return]


def timed_solver(solver: pdq.Solver, clock: Any) -> pdq.Solver:
    """A wrapper of ``solver`` whose calls (and ``unroll`` calls, when ``solver`` has them) set
    the marks ``solve_start``/``solve_end`` on ``clock`` (anything with a ``mark(name)``
    method). It satisfies the solver protocol, so ``DEQ`` accepts it like ``solver`` itself."""
    if isinstance(solver, pdq.UnrollingSolver):
        return _TimedUnrollingSolver(solver, clock)
    return _TimedSolver(solver, clock)


@dataclass
class MemoryProfile:
    """Result of :func:`cpu_peak_memory`: bytes relative to the live memory at the start."""

    peak_bytes: int
    at_marks: dict[str, int] = field(default_factory=dict)
    events: int = 0


def cpu_peak_memory(fn: Callable[[], object], *, marks: Sequence[str] = ()) -> MemoryProfile:
    """Peak of live CPU tensor bytes while ``fn()`` runs, from the allocator's own events.

    ``torch.profiler`` with ``profile_memory=True`` records one ``[memory]`` event per CPU
    allocation (positive ``nbytes``) and per free (negative ``nbytes``) with its timestamp. Their
    running sum, in time order, is the number of bytes allocated during ``fn`` that are still
    live; its maximum is the peak. Frees of memory allocated before profiling started carry no
    size and are ignored (so the result never under-counts). ``marks`` are names of
    ``record_function`` ranges opened by ``fn`` as ``phantomdeq.mark.<name>``; the live bytes at
    each one's start are returned in ``at_marks``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False
    ) as prof:
        fn()
    raw = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    mem: list[tuple[int, int]] = []
    mark_ts: dict[str, int] = {}
    for e in raw:
        name = e.name()
        if name == "[memory]":
            if e.device_type() == torch.autograd.DeviceType.CPU:
                mem.append((e.start_ns(), e.nbytes()))
        elif name.startswith("phantomdeq.mark."):
            mark_ts[name[len("phantomdeq.mark.") :]] = e.start_ns()
    mem.sort(key=lambda t: t[0])
    live = 0
    peak = 0
    at: dict[str, int] = {}
    pending = sorted((ts, m) for m, ts in mark_ts.items() if m in marks)
    i = 0
    for ts, nbytes in mem:
        while i < len(pending) and pending[i][0] < ts:
            at[pending[i][1]] = live
            i += 1
        live += nbytes
        peak = max(peak, live)
    for _, m in pending[i:]:
        at[m] = live
    return MemoryProfile(peak_bytes=peak, at_marks=at, events=len(mem))


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
        fwd = pdq.solvers.from_name(cfg.solver, max_iter=cfg.fwd_iters, tol=0.0)
        self.model = build_model(
            cfg.model, num_classes=cfg.num_classes, in_channels=3, solver=fwd, grad=pdq.OneStep()
        ).to(self.dev)
        self.model.train()
        gen = torch.Generator().manual_seed(cfg.seed + 1)
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
        self.estimators = {name: spec.make(cfg) for name, spec in self.specs.items()}
        self.last_info: dict[str, Any] = {}
        self._graphed: dict[str, pdq.DEQ] = {}
        self._compiled: dict[str, Callable[..., Any]] = {}

    def _inputs(self) -> tuple[Any, torch.Tensor]:
        cfg, model = self.cfg, self.model
        with _autocast(cfg):
            inj = model.stem(self.x)
        inj = inj.float()
        z0 = model.initial_state(inj)
        model.f.reset(z0, generator=torch.Generator().manual_seed(cfg.seed + 2))
        return z0, inj

    def _head_loss(self, z: Any) -> torch.Tensor:
        with _autocast(self.cfg):
            logits = self.model.head(z if isinstance(z, tuple) else (z,))
        return F.cross_entropy(logits.float(), self.y)

    def supports(self, name: str, mode: str) -> bool:
        """BPTT records its forward iteration: no captured solve."""
        return not (mode == "graph" and self.specs[name].family == "bptt")

    def step(self, name: str, clock: Any, mode: str = "eager") -> float:
        spec = self.specs[name]
        solver = self.bptt_solver if spec.family == "bptt" else self.fwd_solver
        self.model.zero_grad(set_to_none=True)
        clock.mark("start")
        z0, inj = self._inputs()
        if mode == "compile":
            fn = self._compiled.get(name)
            if fn is None:
                deq = pdq.DEQ(self.cell, solver=solver, grad=self.estimators[name])

                def core(z0: Any, inj: torch.Tensor, deq: pdq.DEQ = deq) -> Any:
                    z, info = deq(z0, inj)
                    return self._head_loss(z), info

                fn = self._compiled[name] = torch.compile(core)
            loss, info = fn(z0, inj)
        else:
            if mode == "graph":
                if name not in self._graphed:
                    self._graphed[name] = pdq.DEQ(
                        self.cell, solver=solver, grad=self.estimators[name], cuda_graph=True
                    )
                deq = self._graphed[name]
                graphs = deq._graphs
                deq._graphs = _TimedGraphs(graphs, clock)  # type: ignore[assignment]
                try:
                    z, info = deq(z0, inj)
                finally:
                    deq._graphs = graphs
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


def _rotate(seq: list[str], r: int) -> list[str]:
    if not seq:
        return seq
    r %= len(seq)
    return seq[r:] + seq[:r]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


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
    cuda = bench.dev.type == "cuda"
    samples: dict[str, dict[str, list[float]]] = {
        n: {
            "solve_ms": [],
            "forward_ms": [],
            "backward_ms": [],
            "step_ms": [],
            "peak_mb": [],
            "graph_mb": [],
        }
        for n in names
    }
    losses: dict[str, float] = {}
    total = cfg.warmup + cfg.repeats
    for r in range(total):
        for name in _rotate(names, r):
            clock = _Clock(bench.dev)
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
            s["solve_ms"].append(clock.ms("solve_start", "solve_end"))
            s["forward_ms"].append(clock.ms("start", "fwd_end"))
            s["backward_ms"].append(clock.ms("fwd_end", "bwd_end"))
            s["step_ms"].append(clock.ms("start", "bwd_end"))
            if cuda:
                s["peak_mb"].append((torch.cuda.max_memory_allocated() - base) / 2**20)
        say(f"round {r + 1}/{total} done" + (" (warm-up)" if r < cfg.warmup else ""))

    memory_method = "cuda_max_memory_allocated" if cuda else "profiler_cpu_allocator_events"
    if cfg.memory and not cuda:
        for name in names:
            clock = _Clock(bench.dev, profile_marks=True)
            method, mode = name.split("@")
            prof = cpu_peak_memory(
                lambda m=method, c=clock, md=mode: bench.step(m, c, md),  # type: ignore[misc]
                marks=("fwd_end",),
            )
            samples[name]["peak_mb"].append(prof.peak_bytes / 2**20)
            samples[name]["graph_mb"].append(prof.at_marks.get("fwd_end", 0) / 2**20)
            say(f"memory {name}: peak {prof.peak_bytes / 2**20:.1f} MiB")
    if cfg.memory and cuda:
        for name in names:  # graph memory at the end of the forward pass: one extra step
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            hold: dict[str, int] = {}

            class _MemClock(_Clock):
                def mark(self, mark_name: str, hold: dict[str, int] = hold) -> None:
                    super().mark(mark_name)
                    if mark_name == "fwd_end":
                        hold["fwd_end"] = torch.cuda.memory_allocated()

            method, mode = name.split("@")
            bench.step(method, _MemClock(bench.dev), mode)
            samples[name]["graph_mb"].append((hold.get("fwd_end", base) - base) / 2**20)

    records: list[dict[str, Any]] = []
    for key in names:
        name, mode = key.split("@")
        spec = bench.specs[name]
        s = samples[key]
        info = bench.last_info.get(key)
        rec: dict[str, Any] = {
            "method": name,
            "mode": mode,
            "label": spec.label,
            "family": spec.family,
            "k": spec.k,
            "lam": cfg.lam if spec.family in ("upg", "upg_ckpt", "npg") else None,
            "backward_solver": spec.backward_solver,
            "bwd_iters": cfg.bwd_iters if spec.family == "ift" else None,
            "forward_solver": "fixed_point" if spec.family == "bptt" else cfg.solver,
            "fwd_iters": cfg.fwd_iters,
            "model": cfg.model,
            "batch": cfg.batch,
            "device": cfg.device,
            "amp": cfg.amp,
            "complexity": dict(zip(("time", "mem", "peak_mem"), COMPLEXITY[spec.family])),
            "loss": losses.get(key),
            "forward_rel_residual": float(info.rel_residual.float().mean())
            if info is not None
            else None,
            "memory_method": memory_method if cfg.memory or cuda else None,
            "samples": s,
        }
        for key in ("solve_ms", "forward_ms", "backward_ms", "step_ms"):
            rec[key] = _median(s[key])
            rec[key.replace("_ms", "_min_ms")] = min(s[key]) if s[key] else math.nan
        rec["peak_mb"] = max(s["peak_mb"]) if s["peak_mb"] else None
        rec["graph_mb"] = max(s["graph_mb"]) if s["graph_mb"] else None
        records.append(rec)
    refs = {r["mode"]: r for r in records if r["method"] == cfg.reference}
    for rec in records:
        ref = refs[rec["mode"]]
        rec["reference"] = cfg.reference
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
    return records


# --------------------------------------------------------------------------- reporting


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The paper's Table 2 (complexities) next to the measured times, memory and ratios."""
    if not records:
        return "(no records)"
    ref = records[0]["reference"]
    head = [
        "method",
        "mode",
        "Time",
        "Mem",
        "Peak",
        "solve ms",
        "fwd ms",
        "bwd ms",
        "step ms",
        "graph MiB",
        "peak MiB",
        f"speed-up vs {ref}",
        "(min)",
        "peak / ref",
    ]
    rows = []
    for r in records:
        c = r["complexity"]
        rows.append(
            [
                r["label"],
                r.get("mode", "eager"),
                c["time"],
                c["mem"],
                c["peak_mem"],
                _fmt(r["solve_ms"]),
                _fmt(r["forward_ms"]),
                _fmt(r["backward_ms"]),
                _fmt(r["step_ms"]),
                _fmt(r["graph_mb"]),
                _fmt(r["peak_mb"]),
                _fmt(r["step_ratio"], ".2f") + "x",
                _fmt(r.get("step_ratio_min"), ".2f") + "x",
                _fmt(r["peak_ratio"], ".2f"),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                str(x).ljust(w) if i == 0 else str(x).rjust(w)
                for i, (x, w) in enumerate(zip(row, widths))
            )
        )
    return "\n".join(lines)


def write_plot(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``cost.png``: step time and peak memory vs k for UPG, UPG-ckpt and NPG, with IFT,
    OneStep and BPTT as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [r.get("mode", "eager") for r in records]
    first = modes[0] if modes else "eager"
    records = [r for r, m in zip(records, modes) if m == first]  # one curve set: the first mode
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    metrics = (("step_ms", "step time (ms)"), ("peak_mb", "peak memory (MiB)"))
    ks = sorted({int(r["k"]) for r in records if r["family"] in ("upg", "upg_ckpt", "npg")})
    styles = {"upg": ("UPG", "o-"), "upg_ckpt": ("UPG (checkpointed)", "s--"), "npg": ("NPG", "^-")}
    for ax, (key, ylabel) in zip(axes, metrics):
        for fam, (lab, st) in styles.items():
            pts = sorted(
                (r["k"], r[key]) for r in records if r["family"] == fam and r[key] is not None
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], st, label=lab)
        flat = [
            r for r in records if r["family"] in ("ift", "onestep", "bptt") and r[key] is not None
        ]
        for i, r in enumerate(flat):
            ax.axhline(r[key], color=f"C{3 + i}", linestyle=":", label=r["label"])
        if ks:
            ax.set_xticks(ks)
        ax.set_xlabel("k (phantom-gradient steps)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    r0 = records[0]
    fig.suptitle(
        f"{r0['model']} batch {r0['batch']} on {r0['device']} ({r0['amp']}), forward "
        f"{r0['forward_solver']} x{r0['fwd_iters']}; IFT backward {records[0].get('bwd_iters') or ''} iters"
    )
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = list(os.getloadavg())
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": model,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": load,
    }


# --------------------------------------------------------------------------- CLI


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 1, got {text!r}"
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return vals


def _pos_int(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {text!r}"
            ) from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    from phantomdeq.models import MDEQ_CONFIG_NAMES

    d = CostConfig()
    p = argparse.ArgumentParser(
        prog="phantomdeq cost",
        description="Paper Table 2: time and peak memory of one training step per gradient estimator.",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (cost.json, cost.png)")
    p.add_argument("--model", choices=MDEQ_CONFIG_NAMES, default=d.model)
    p.add_argument("--batch", type=_pos_int(1), default=d.batch)
    p.add_argument("--device", choices=DEVICES, default=d.device)
    p.add_argument("--solver", choices=FORWARD_SOLVERS, default=d.solver, help="forward solver")
    p.add_argument(
        "--fwd-iters", type=_pos_int(2), default=d.fwd_iters, help="forward solver budget (tol=0)"
    )
    p.add_argument(
        "--bwd-iters",
        type=_pos_int(2),
        default=d.bwd_iters,
        help="IFT backward solver budget (tol=0)",
    )
    p.add_argument("--ks", type=_int_list, default=d.ks, help="k values of UPG/NPG, e.g. 1,3,5,9")
    p.add_argument("--lam", type=float, default=d.lam, help="damping λ of UPG/NPG, in (0, 1]")
    p.add_argument("--repeats", type=_pos_int(1), default=d.repeats, help="timed steps per method")
    p.add_argument(
        "--warmup", type=_pos_int(0), default=d.warmup, help="untimed steps per method first"
    )
    p.add_argument(
        "--amp", choices=AMP_MODES, default=d.amp, help="bf16: autocast f, stem and head"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of methods (default: all), e.g. ift_broyden,upg_k5",
    )
    p.add_argument("--reference", default=d.reference, help="method the ratios are taken against")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument(
        "--modes",
        default=",".join(d.modes),
        help=f"comma list of execution modes {EXEC_MODES} timed side by side (graph: CUDA)",
    )
    p.add_argument("--threads", type=_pos_int(1), default=None, help="torch.set_num_threads")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test setting: batch 2, 1 repeat, no warm-up, 2 forward / 2 backward iterations",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = None
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    opts: dict[str, Any] = {
        "model": args.model,
        "batch": args.batch,
        "device": args.device,
        "solver": args.solver,
        "fwd_iters": args.fwd_iters,
        "bwd_iters": args.bwd_iters,
        "ks": args.ks,
        "lam": args.lam,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "amp": args.amp,
        "seed": args.seed,
        "methods": methods,
        "reference": args.reference,
        "memory": not args.no_memory,
        "modes": tuple(m.strip() for m in args.modes.split(",") if m.strip()),
    }
    if args.quick:
        opts.update(batch=2, repeats=1, warmup=0, fwd_iters=2, bwd_iters=2)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (allowed here: cpu)")
    try:
        cfg = CostConfig(**opts)
    except ValueError as e:
        parser.error(str(e))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    machine = _machine()
    print(
        f"phantomdeq cost: {cfg.model} batch {cfg.batch} {cfg.device} amp={cfg.amp}; load {machine['loadavg']}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    records = run(cfg, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    machine_after = _machine()
    payload = {
        "config": asdict(cfg),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "loadavg_after": machine_after["loadavg"],
        "wall_s": wall,
        "records": records,
    }
    (out / "cost.json").write_text(json.dumps(payload, indent=2))
    print(format_table(records))
    try:
        write_plot(records, out / "cost.png")
        wrote = f"{out / 'cost.json'} and {out / 'cost.png'}"
    except ImportError:  # a bare GPU box may lack matplotlib (the `plots` extra)
        wrote = f"{out / 'cost.json'} (no cost.png: matplotlib is not installed)"
    print(f"wrote {wrote} ({wall:.1f} s)")
    return 0
