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

The method list and the options are in :mod:`.cost_methods`. Outputs in ``--out`` (:mod:`.cost_cli`, :mod:`.cost_report`): ``cost.json``
(configuration, machine, records), ``cost.png`` (step time and peak memory vs k per method);
the Table-2-style table with ratios to the reference IFT on stdout. The measuring tools are in
:mod:`.profiling`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import phantomdeq as pdq
from phantomdeq.train.seeds import seed_of

from .cost_methods import (
    BACKWARD_SOLVERS,
    COMPLEXITY,
    EXEC_MODES,
    SOLVERS,
    CostConfig,
    MethodSpec,
    method_specs,
)
from .profiling import Clock, cpu_peak_memory, timed_solver

__all__ = [
    "BACKWARD_SOLVERS",
    "COMPLEXITY",
    "EXEC_MODES",
    "SOLVERS",
    "CostConfig",
    "MethodSpec",
    "method_specs",
    "run",
]

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
