"""Question: how many tokens per second does a training step of the DEQ language model process
against the explicit Transformer it replaces?

A training step is forward, per-token cross-entropy, backward and an AdamW update on one batch
of ``batch x context`` characters. Variants (width 128, 4 heads, context 64, batch 12 by
default): ``deq_upg`` -- the DEQ-Transformer LM (``phantomdeq.models.deq_lm``) with Anderson
(max_iter 30, tol 1e-3) and UPG(5, 0.5); ``deq_npg`` -- NPG(5, 0.5); ``deq_ift`` -- IFT with a
fixed-point backward solve (max_iter 30, tol 1e-3); ``explicit`` -- the explicit 4-block
Transformer (``phantomdeq.models.transformer``). Each variant first trains ``--warmup-steps``
steps (untimed: the DEQ's solver iterations depend on the weights, and a model at
initialisation is far more contractive than a trained one), then the variants take turns, one
timed step each, for ``--repeats`` rounds on the same batches; the median step time gives
tokens/s, and the DEQ's mean forward iterations over the timed steps are reported beside. The
fastest step of each variant is reported too: on a machine shared with other work it is the
one least disturbed by them.

Data: Tiny Shakespeare when ``--data`` (default ``../shared/data/tinyshakespeare/input.txt``
beside the repository) exists, else random tokens over a 65-character vocabulary.

    python benchmarks/lm_tokens_per_second.py [--variants deq_upg,explicit] [--threads 2]
        [--warmup-steps 50] [--repeats 10] [--out benchmarks/results/lm_tokens_per_second.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
from _common import machine, print_table, write_json  # noqa: E402
from phantomdeq.data.text import TextBatches, load_text  # noqa: E402
from phantomdeq.models import deq_lm, transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_CORPUS = Path("shared") / "data" / "tinyshakespeare" / "input.txt"
# beside the repository (the main checkout), or beside a worktree's parent folder
DEFAULT_DATA = next(
    (b / _CORPUS for b in (ROOT.parent, ROOT.parent.parent) if (b / _CORPUS).is_file()),
    ROOT.parent / _CORPUS,
)


def _solver() -> pdq.Anderson:
    return pdq.Anderson(max_iter=30, tol=1e-3)


VARIANTS: dict[str, Callable[[int, dict[str, Any]], torch.nn.Module]] = {
    "deq_upg": lambda v, kw: deq_lm.build(v, solver=_solver(), grad=pdq.UPG(k=5, lam=0.5), **kw),
    "deq_npg": lambda v, kw: deq_lm.build(v, solver=_solver(), grad=pdq.NPG(k=5, lam=0.5), **kw),
    "deq_ift": lambda v, kw: deq_lm.build(
        v,
        solver=_solver(),
        grad=pdq.IFT(solver=pdq.FixedPoint(max_iter=30, tol=1e-3), warn_unconverged=False),
        **kw,
    ),
    "explicit": lambda v, kw: transformer.build(v, layers=4, **kw),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="deq_upg,deq_npg,deq_ift,explicit")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lm_tokens_per_second.json"))
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        print(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if Path(args.data).is_file():
        corpus = load_text(args.data)
        train, vocab_size, data = corpus.train, corpus.vocab_size, str(args.data)
    else:
        gen = torch.Generator().manual_seed(args.seed)
        vocab_size = 65
        train = torch.randint(vocab_size, (200_000,), generator=gen)
        data = "random tokens (vocab 65)"
    kw = {"width": args.width, "heads": args.heads, "context": args.context}
    models, opts, samplers = {}, {}, {}
    for name in names:
        torch.manual_seed(args.seed)
        models[name] = VARIANTS[name](vocab_size, kw).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=args.lr)
        samplers[name] = TextBatches(
            train, batch_size=args.batch, context=args.context, seed=args.seed
        )

    def step(name: str) -> tuple[float, float, float]:
        model, opt = models[name], opts[name]
        x, y = next(samplers[name])
        t0 = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        niter = float(out.info.niter) if out.info is not None else float("nan")
        return dt, niter, loss.item()

    for _ in range(args.warmup_steps):
        for name in names:
            step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    iters: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):
        for name in names:
            dt, it, loss = step(name)
            times[name].append(dt)
            iters[name].append(it)
            losses[name] = loss
    tokens = args.batch * args.context
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        med = statistics.median(times[name])
        results[name] = {
            "step_s_median": med,
            "step_s_min": min(times[name]),
            "tokens_per_s_best": tokens / min(times[name]),
            "step_s_all": times[name],
            "tokens_per_s": tokens / med,
            "forward_iterations_mean": statistics.fmean(iters[name]),
            "loss_last": losses[name],
            "parameters": sum(p.numel() for p in models[name].parameters()),
        }
    base = results.get("explicit", {}).get("tokens_per_s")
    base_best = results.get("explicit", {}).get("tokens_per_s_best")
    rows = [
        [
            name,
            r["parameters"],
            1000 * r["step_s_median"],
            r["tokens_per_s"],
            (r["tokens_per_s"] / base) if base else float("nan"),
            1000 * r["step_s_min"],
            (r["tokens_per_s_best"] / base_best) if base_best else float("nan"),
            r["forward_iterations_mean"],
            r["loss_last"],
        ]
        for name, r in results.items()
    ]
    print(
        f"batch {args.batch} x context {args.context}, width {args.width}, {args.heads} heads, "
        f"{args.threads} threads, after {args.warmup_steps} warm-up steps, median of "
        f"{args.repeats}; data: {data}"
    )
    print_table(
        [
            "variant",
            "params",
            "step ms",
            "tokens/s",
            "vs explicit",
            "min ms",
            "vs explicit (min)",
            "fwd iters",
            "loss",
        ],
        rows,
    )
    write_json(
        args.out,
        {
            "question": "tokens/s of a training step: DEQ-LM vs explicit Transformer",
            "command": "python benchmarks/lm_tokens_per_second.py " + " ".join(sys.argv[1:]),
            "config": {**vars(args), "data": data},
            "machine": machine(),
            "results": results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
