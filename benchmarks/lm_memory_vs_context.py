"""Question: how does the memory of one language-model training step grow with the context
length, for the DEQ-Transformer LM under each gradient estimator against the explicit
Transformer -- is the DEQ's memory O(1) in depth on sequences, and where does that stop?

A training step is forward, per-token cross-entropy and backward (no optimizer step) on one
batch of ``batch x context`` random tokens over a 65-character vocabulary (the memory does not
depend on the text). Variants (the presets' sizes, configs/deq_lm_shakespeare.yaml and
configs/transformer_lm_shakespeare.yaml: width 128, 4 heads, MLP ratio 4; each model built
with ``context`` equal to the measured length):

* ``deq_ift`` -- DEQ-LM (``phantomdeq.models.deq_lm``), forward Anderson (max_iter 30,
  tol 1e-3, the preset's), IFT with an Anderson backward solve (max_iter 30, tol 1e-3);
* ``deq_npg`` -- the same forward, NPG(5, 0.5);
* ``deq_upg_ckpt`` -- UPG(5, 0.5) with ``checkpoint=True`` (each unrolled step recomputed in
  the backward pass);
* ``deq_upg`` -- UPG(5, 0.5) without checkpointing;
* ``explicit_4`` -- the explicit 4-block Transformer (``phantomdeq.models.transformer``), the
  reference of the ratios;

and, at ``--depth-context`` only (depth): ``explicit_L`` for each ``--depth-layers`` L, and
each DEQ variant again as ``<name>_fixed<N>`` with a fixed budget of ``--fixed-iterations`` N
solver iterations (forward, and IFT's backward; tol 0) -- at initialisation the preset's
solver meets its tolerance in a few iterations, so this is the DEQ made N "layers" deep.

Memory is measured as ``phantomdeq cost`` measures it on CPU
(:func:`phantomdeq.experiments.measure.cpu_peak_memory`): a step under ``torch.profiler``
with ``profile_memory=True``; the running sum of the CPU allocator's allocation and free events
is the live tensor memory allocated since the step began. Each configuration builds a fresh
model and takes two steps, each profiled. "peak MiB" is the first step's maximum: everything a
step needs beyond the parameters, including the parameter gradients (set to None before each
step) and the solvers' history buffers (on CPU a solver keeps them between solves, so a later
step no longer allocates them: "2nd-step peak" is that step's maximum). "graph MiB" is the live
memory at the end of the second step's forward pass (after the loss): what the autograd graph
holds for the backward pass. The allocator's events make the figures deterministic, whatever
else runs on the machine (unlike RSS). ``--attention`` names the kernels of
``scaled_dot_product_attention`` to measure under: ``default`` lets PyTorch pick (on CPU a
fused flash-attention kernel that never stores the T x T attention matrix), ``math`` forces the
math kernel, which does.

    OMP_NUM_THREADS=1 python benchmarks/lm_memory_vs_context.py [--contexts 64,128,256,512]
        [--batch 4] [--depth-layers 8,16] [--depth-context 512] [--fixed-iterations 30]
        [--attention default,math] [--out benchmarks/results/lm_memory_vs_context.json]
    python benchmarks/lm_memory_vs_context.py --dry-run --out /tmp/m.json   # tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
from _common import print_table, write_json  # noqa: E402
from phantomdeq.experiments.measure import Clock, cpu_peak_memory, machine  # noqa: E402
from phantomdeq.models import deq_lm, transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 65
REFERENCE = "explicit_4"
ATTENTION = ("default", "math")


Builder = Callable[[dict[str, Any]], torch.nn.Module]


def _solver(fixed: int | None) -> pdq.Anderson:
    """The preset's forward solver, or a fixed budget of ``fixed`` iterations (tol 0)."""
    return (
        pdq.Anderson(max_iter=30, tol=1e-3)
        if fixed is None
        else pdq.Anderson(max_iter=fixed, tol=0.0)
    )


def _variants(fixed: int | None = None) -> dict[str, tuple[Builder, str]]:
    """The variants measured at every context: name -> (builder, description); with ``fixed``
    the DEQ's forward (and IFT's backward) solver runs exactly ``fixed`` iterations."""

    def deq(grad: Callable[[], pdq.GradientEstimator]) -> Builder:
        return lambda kw: deq_lm.build(VOCAB, solver=_solver(fixed), grad=grad(), **kw)

    budget = "max_iter 30, tol 1e-3" if fixed is None else f"{fixed} iterations, tol 0"
    return {
        "deq_ift": (
            deq(lambda: pdq.IFT(solver=_solver(fixed), warn_unconverged=False)),
            f"DEQ, IFT (Anderson backward, {budget})",
        ),
        "deq_npg": (deq(lambda: pdq.NPG(k=5, lam=0.5)), "DEQ, NPG(5, 0.5)"),
        "deq_upg_ckpt": (
            deq(lambda: pdq.UPG(k=5, lam=0.5, checkpoint=True)),
            "DEQ, UPG(5, 0.5), checkpoint=True",
        ),
        "deq_upg": (deq(lambda: pdq.UPG(k=5, lam=0.5)), "DEQ, UPG(5, 0.5)"),
        REFERENCE: (lambda kw: transformer.build(VOCAB, layers=4, **kw), "explicit, 4 blocks"),
    }


VARIANTS = _variants()


def _explicit(layers: int) -> tuple[Builder, str]:
    return (
        lambda kw: transformer.build(VOCAB, layers=layers, **kw),
        f"explicit, {layers} blocks",
    )


@contextlib.contextmanager
def _attention(kind: str) -> Iterator[None]:
    if kind == "math":
        with sdpa_kernel(SDPBackend.MATH):
            yield
    else:
        yield


def measure(
    model: torch.nn.Module, idx: torch.Tensor, target: torch.Tensor, attention: str
) -> dict[str, Any]:
    """Two training steps of a fresh model, each under the profiler: the first step's peak
    (everything a step allocates, the solvers' history buffers included), the second step's
    peak and its live memory at the end of the forward pass (the autograd graph; the solvers'
    buffers, kept between solves on CPU, were allocated in the first step), the forward
    solver's mean iterations (DEQ) and the first step's wall time (profiler included)."""
    hold: dict[str, float] = {}

    def step(clock: Clock) -> None:
        out = model(idx)
        loss = F.cross_entropy(out.logits.flatten(0, 1), target.flatten())
        clock.mark("fwd_end")
        loss.backward()
        info = out.info
        hold["niter"] = float(info.nstep.float().mean()) if info is not None else float("nan")

    profiles = []
    with _attention(attention):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            clock = Clock(torch.device("cpu"), profile_marks=True)
            t0 = time.perf_counter()
            profiles.append(cpu_peak_memory(lambda c=clock: step(c), marks=("fwd_end",)))  # type: ignore[misc]
            hold.setdefault("wall", time.perf_counter() - t0)
    first, second = profiles
    return {
        "peak_mib": first.peak_bytes / 2**20,
        "second_step_peak_mib": second.peak_bytes / 2**20,
        "graph_mib": second.at_marks.get("fwd_end", 0) / 2**20,
        "forward_iterations": hold["niter"],
        "profiled_step_s": hold["wall"],
    }


def _ints(text: str, flag: str) -> list[int]:
    """A comma list of positive integers; ValueError naming ``flag`` otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: a comma list of positive integers, got {text!r}")
    return values


def _depth_fit(
    rows: list[dict[str, Any]], kernels: list[str], context: int
) -> dict[str, dict[str, Any]]:
    """Per kernel, the explicit models' first-step peak at ``context`` fitted as ``a + b L``
    over their depths L (least squares; needs two depths), and each DEQ variant's peak there
    expressed as the depth of an explicit model with the same peak, ``(peak - a) / b``."""
    out: dict[str, dict[str, Any]] = {}
    for kernel in kernels:
        at = [r for r in rows if r["attention"] == kernel and r["context"] == context]
        pts = sorted(
            (int(r["variant"].split("_")[1]), r["peak_mib"])
            for r in at
            if r["variant"].startswith("explicit_")
        )
        if len(pts) < 2:
            continue
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        intercept = my - slope * mx
        out[kernel] = {
            "context": context,
            "layers": [x for x, _ in pts],
            "per_block_mib": slope,
            "intercept_mib": intercept,
            "equivalent": {
                r["variant"]: {
                    "peak_mib": r["peak_mib"],
                    "blocks": (r["peak_mib"] - intercept) / slope,
                }
                for r in at
                if r["variant"].startswith("deq_")
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="64,128,256,512")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-ratio", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--depth-layers", default="8,16", help="explicit depths at --depth-context")
    ap.add_argument("--depth-context", type=int, default=512)
    ap.add_argument(
        "--fixed-iterations",
        type=int,
        default=30,
        help="the DEQ variants again at --depth-context with a fixed solver budget (0: skip)",
    )
    ap.add_argument(
        "--attention", default="default,math", help=f"comma list of {', '.join(ATTENTION)}"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (seconds), for tests")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lm_memory_vs_context.json"))
    args = ap.parse_args(argv)
    if args.dry_run:
        args.contexts, args.batch, args.width, args.heads = "8,16", 2, 16, 2
        args.depth_layers, args.depth_context, args.fixed_iterations = "8", 16, 4
    try:
        contexts = _ints(args.contexts, "--contexts")
        depths = _ints(args.depth_layers, "--depth-layers") if args.depth_layers else []
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        print(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    kernels = [a.strip() for a in args.attention.split(",") if a.strip()]
    if not kernels or any(a not in ATTENTION for a in kernels):
        print(f"--attention: a comma list of {', '.join(ATTENTION)}", file=sys.stderr)
        return 2
    if REFERENCE not in names:
        names.append(REFERENCE)
    torch.set_num_threads(args.threads)
    extra = {f"explicit_{layers}": _explicit(layers) for layers in depths}
    if args.fixed_iterations > 0:
        fixed = _variants(args.fixed_iterations)
        for n in names:
            if n != REFERENCE:
                build, description = fixed[n]
                extra[f"{n}_fixed{args.fixed_iterations}"] = (
                    build,
                    f"{description}, forward Anderson {args.fixed_iterations} iterations, tol 0",
                )
    builders = {**VARIANTS, **extra}
    plan: list[tuple[str, str, int]] = []
    for kernel in kernels:
        plan += [(kernel, n, t) for t in contexts for n in names]
        if depths and args.depth_context not in contexts:
            plan.append((kernel, REFERENCE, args.depth_context))
        plan += [(kernel, n, args.depth_context) for n in extra]

    started = {
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": machine()["loadavg"],
    }
    rows: list[dict[str, Any]] = []
    for kernel, name, ctx in plan:
        build, description = builders[name]
        kw = {"width": args.width, "heads": args.heads, "context": ctx, "mlp_ratio": args.mlp_ratio}
        torch.manual_seed(args.seed)
        model = build(kw).train()
        gen = torch.Generator().manual_seed(args.seed + ctx)
        tokens = torch.randint(VOCAB, (args.batch, ctx + 1), generator=gen)
        rec: dict[str, Any] = {
            "attention": kernel,
            "variant": name,
            "description": description,
            "context": ctx,
            "parameters": sum(p.numel() for p in model.parameters()),
            # reference sizes (float32): one state [B, T, width] and one attention matrix
            # [B, heads, T, T], the tensor the math kernel stores and the fused one does not
            "state_mib": 4 * args.batch * ctx * args.width / 2**20,
            "attention_matrix_mib": 4 * args.batch * args.heads * ctx * ctx / 2**20,
        }
        rec.update(measure(model, tokens[:, :-1], tokens[:, 1:], kernel))
        rows.append(rec)
        print(
            f"{kernel:>7} {name:>13} T={ctx:<4} peak {rec['peak_mib']:8.1f} MiB  graph "
            f"{rec['graph_mib']:8.1f} MiB  ({rec['profiled_step_s']:.1f} s)",
            flush=True,
        )
        del model

    ref = {(r["attention"], r["context"]): r for r in rows if r["variant"] == REFERENCE}
    for r in rows:
        base = ref.get((r["attention"], r["context"]))
        r["peak_vs_explicit_4"] = r["peak_mib"] / base["peak_mib"] if base else None
        r["graph_vs_explicit_4"] = r["graph_mib"] / base["graph_mib"] if base else None
    # growth from the shortest to the longest context: memory linear in T grows by the same
    # factor as T, memory quadratic in T by its square
    growth: dict[str, dict[str, dict[str, float]]] = {}
    lo, hi = min(contexts), max(contexts)
    for kernel in kernels:
        for n in names:
            by_t = {r["context"]: r for r in rows if r["variant"] == n and r["attention"] == kernel}
            if lo in by_t and hi in by_t and lo != hi:
                growth.setdefault(kernel, {})[n] = {
                    "context_factor": hi / lo,
                    "peak_factor": by_t[hi]["peak_mib"] / by_t[lo]["peak_mib"],
                    "graph_factor": by_t[hi]["graph_mib"] / by_t[lo]["graph_mib"],
                }

    depth = _depth_fit(rows, kernels, args.depth_context)

    print(
        f"\nbatch {args.batch}, width {args.width}, {args.heads} heads, MLP ratio "
        f"{args.mlp_ratio}, {args.threads} thread(s); peak: first step of a fresh model; "
        "graph: live at the end of the second step's forward pass"
    )
    print_table(
        [
            "attention",
            "variant",
            "context",
            "params",
            "fwd iters",
            "graph MiB",
            "peak MiB",
            "2nd-step peak",
            "peak / expl-4",
        ],
        [
            [
                r["attention"],
                r["variant"],
                r["context"],
                r["parameters"],
                r["forward_iterations"],
                r["graph_mib"],
                r["peak_mib"],
                r["second_step_peak_mib"],
                r["peak_vs_explicit_4"] if r["peak_vs_explicit_4"] is not None else float("nan"),
            ]
            for r in rows
        ],
    )
    for kernel, by_name in growth.items():
        print(f"\n{kernel} attention: growth from context {lo} to {hi} (x{hi / lo:g}):")
        print_table(
            ["variant", "peak factor", "graph factor"],
            [[n, g["peak_factor"], g["graph_factor"]] for n, g in by_name.items()],
        )
    for kernel, fit in depth.items():
        print(
            f"\n{kernel} attention, context {args.depth_context}: explicit peak = "
            f"{fit['intercept_mib']:.1f} + {fit['per_block_mib']:.2f} MiB x blocks "
            f"(least squares over {fit['layers']}); the same peak as an explicit model of:"
        )
        print_table(
            ["variant", "peak MiB", "explicit blocks"],
            [[n, e["peak_mib"], e["blocks"]] for n, e in fit["equivalent"].items()],
        )
    write_json(
        args.out,
        {
            "question": "peak and graph memory of one LM training step against context length: "
            "DEQ-LM (IFT, NPG, UPG-checkpointed, UPG) vs the explicit Transformer",
            "command": " ".join(
                [
                    "OMP_NUM_THREADS=1 python benchmarks/lm_memory_vs_context.py",
                    *(sys.argv[1:] if argv is None else argv),
                ]
            ),
            "memory_method": "profiler_cpu_allocator_events",
            "config": {**vars(args), "vocab_size": VOCAB, "reference": REFERENCE},
            "started": started,
            "machine": machine(),  # its loadavg: at the end
            "rows": rows,
            "growth": growth,
            "depth": depth,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
