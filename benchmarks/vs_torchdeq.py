"""Question: does phantomdeq compute the same gradients as TorchDEQ 0.1.0, and is it faster?

Side by side in one process, same cell ``f`` with identical weights, same data, same dropout
masks, same forward solver and iteration budget, runs alternating between the libraries:

(a) Gradient agreement on small float64 problems solved to 1e-12: phantomdeq ``UPG(k, λ)`` vs
    TorchDEQ ``grad=k, tau=λ`` (both unroll ``h <- λ f(h) + (1 - λ) h`` k times from the detached
    solution), and phantomdeq ``IFT`` vs TorchDEQ ``ift=True`` (both solve
    ``v = (∂f/∂h)ᵀ v + g``); cosine similarity and relative error of the parameter gradients.
(b) Time: forward solve (each DEQ module in eval mode under ``no_grad``) and full training step
    (forward + cross-entropy/MSE loss + backward) for FixedPoint, Anderson and Broyden forward
    solvers, with UPG(k, λ) and IFT (backward solver of the same kind as the forward one, fixed
    budget) on the single-tensor conv DEQ (``_common.ConvCell``, MDEQ-Tiny block, 24 channels)
    and on MDEQ-Tiny (tuple state, through its stem and head).

Matching settings: ``tol=0`` everywhere so both run the full budget; stop mode ``rel``; Anderson
memory m=5 and regularisation 1e-4 on both sides. Budgets are matched in evaluations of ``f``
(NFE): TorchDEQ's Broyden evaluates ``f`` once more than its ``max_iter`` (an initial evaluation,
then one per step) and phantomdeq's counts the initial one, so TorchDEQ Broyden gets
``max_iter = N - 1`` for N of ours (forward and backward). TorchDEQ's IFT recomputes ``f(h*)`` in
its backward pass; that cost is part of its design and stays in.

    python benchmarks/vs_torchdeq.py [--device cpu|cuda] [--batch 32] [--repeats 3] [--quick]
        [--modes eager,compile,graph] [--out benchmarks/results/vs_torchdeq.json]

``--modes``: how phantomdeq runs, side by side with (eager) TorchDEQ in the same rounds --
``eager``; ``compile`` (the DEQ module through ``torch.compile``); ``graph`` (CUDA only: the
forward solve replayed from a CUDA graph, ``DEQ(cuda_graph=True)``). Ratios are phantomdeq in
each mode / TorchDEQ.

Exits 0 with a message when TorchDEQ is not importable (``pip install --no-deps torchdeq==0.1.0``,
the ``peer`` extra).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantomdeq as pdq  # noqa: E402
from _common import ConvCell, interleaved_medians, loadavg, machine, print_table, write_json  # noqa: E402

SOLVERS = ("fixed_point", "anderson", "broyden")
TD_SOLVER = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
MODELS = ("conv", "mdeq_tiny")


def _import_torchdeq() -> Any | None:
    try:
        import torchdeq  # noqa: F401
        from torchdeq import get_deq
    except ImportError:
        return None
    return get_deq


# --------------------------------------------------------------------------- matched settings


def ours_solver(name: str, n: int, tol: float = 0.0) -> pdq.Solver:
    if name == "anderson":
        return pdq.Anderson(max_iter=n, tol=tol, stop="rel", m=5, lam=1e-4)
    return pdq.solvers.from_name(name, max_iter=n, tol=tol, stop="rel")


def td_iters(name: str, n: int) -> int:
    """TorchDEQ ``max_iter`` with the same number of f evaluations as ``n`` of ours."""
    return n - 1 if name == "broyden" else n


def make_td(
    get_deq: Any,
    *,
    solver: str,
    iters: int,
    grad: str,
    k: int,
    lam: float,
    bwd_iters: int,
    tol: float = 0.0,
) -> Any:
    kw: dict[str, Any] = {
        "core": "sliced",
        "f_solver": TD_SOLVER[solver],
        "f_max_iter": td_iters(solver, iters),
        "f_tol": tol,
        "f_stop_mode": "rel",
        "b_solver": TD_SOLVER[solver],
        "b_max_iter": td_iters(solver, bwd_iters),
        "b_tol": tol,
        "b_stop_mode": "rel",
        "eval_factor": 1.0,
    }
    if grad == "ift":
        kw["ift"] = True
    else:
        kw.update(grad=k, tau=lam)
    return get_deq(**kw)


def make_ours(
    cell: nn.Module,
    *,
    solver: str,
    iters: int,
    grad: str,
    k: int,
    lam: float,
    bwd_iters: int,
    tol: float = 0.0,
    cuda_graph: bool = False,
) -> pdq.DEQ:
    est: pdq.GradientEstimator
    if grad == "ift":
        est = pdq.IFT(solver=ours_solver(solver, bwd_iters, tol))
    else:
        est = pdq.UPG(k=k, lam=lam)
    return pdq.DEQ(cell, solver=ours_solver(solver, iters, tol), grad=est, cuda_graph=cuda_graph)


TD_SOLVER_KW = {"m": 5, "lam": 1e-4}  # Anderson options passed per call (ignored by the others)


# --------------------------------------------------------------------------- problems


class Problem:
    """A cell, its inputs and a loss; ``run(lib, deq)`` does one forward (+ loss) pass."""

    def __init__(
        self,
        kind: str,
        *,
        batch: int,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
        channels: int = 24,
    ) -> None:
        from phantomdeq.models import build_model

        self.kind = kind
        self.device = device
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.seed = seed
        if kind == "conv":
            self.cell = ConvCell(channels).to(device=device, dtype=dtype).train()
            self.x = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype).to(device)
            self.target = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype).to(
                device
            )
            self.model = None
        elif kind == "mdeq_tiny":
            self.model = build_model(
                "mdeq_tiny",
                num_classes=10,
                in_channels=3,
                solver=pdq.FixedPoint(),
                grad=pdq.OneStep(),
            ).to(device=device, dtype=dtype)
            self.model.train()
            self.cell = self.model.f
            self.x = torch.randn(batch, 3, size, size, generator=gen, dtype=dtype).to(device)
            self.target = torch.randint(0, 10, (batch,), generator=gen).to(device)
        else:
            raise ValueError(f"model must be one of {MODELS}, got {kind!r}")

    def parameters(self) -> list[Tensor]:
        mod = self.model if self.model is not None else self.cell
        return [p for p in mod.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def _inputs(self) -> tuple[Any, Any]:
        if self.model is None:
            return torch.zeros_like(self.x), self.x
        inj = self.model.stem(self.x)
        z0 = self.model.initial_state(inj)
        self.model.f.reset(z0, generator=torch.Generator().manual_seed(self.seed + 2))
        return z0, inj

    def loss(self, z: Any) -> Tensor:
        if self.model is None:
            return F.mse_loss(z, self.target)
        return F.cross_entropy(self.model.head(tuple(z)), self.target)

    def forward(self, lib: str, deq: Any) -> tuple[Any, Tensor]:
        z0, inp = self._inputs()
        if lib == "ours":
            z, _ = deq(z0, inp)
        else:
            cell = self.cell
            if self.model is None:
                z_out, _ = deq(lambda z: cell(z, inp), z0, solver_kwargs=dict(TD_SOLVER_KW))
            else:
                z_out, _ = deq(
                    lambda *zs: cell(zs, inp), list(z0), solver_kwargs=dict(TD_SOLVER_KW)
                )
            z = z_out[-1]
        return z, self.loss(z)

    def step(self, lib: str, deq: Any) -> float:
        self.zero_grad()
        _, loss = self.forward(lib, deq)
        loss.backward()
        return float(loss.detach())

    def solve(self, lib: str, deq: Any) -> None:
        with torch.no_grad():
            self.forward(lib, deq)

    def grads(self) -> Tensor:
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self.parameters()
            ]
        )


# --------------------------------------------------------------------------- (a) agreement


class SmallCell(nn.Module):
    """A contractive conv cell for the agreement check (the benchmark cells are not contractive,
    so their fixed points cannot be solved to 1e-12): ``tanh(W2 relu(W1 z) + x)`` with small
    weights, on one tensor, or on a pair of tensors (``tuple_state=True``) like MDEQ's branches."""

    def __init__(self, channels: int = 4, *, tuple_state: bool = False) -> None:
        super().__init__()
        self.tuple_state = tuple_state
        self.c1 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.c2 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.mix = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            for conv in (self.c1, self.c2, self.mix):
                conv.weight.mul_(0.5)

    def forward(self, z: Any, x: Tensor) -> Any:
        if not self.tuple_state:
            return torch.tanh(self.c2(torch.relu(self.c1(z))) + x)
        a, b = z
        a_new = torch.tanh(self.c2(torch.relu(self.c1(a))) + 0.5 * self.mix(b) + x)
        b_new = torch.tanh(self.mix(a) + 0.5 * b)
        return (a_new, b_new)


def agreement(
    get_deq: Any, *, tuple_state: bool, k: int, lam: float, device: torch.device
) -> list[dict[str, Any]]:
    """UPG vs grad=k/tau and IFT vs ift=True on a float64 contractive problem solved to 1e-12;
    the loss is a fixed random projection of the equilibrium state."""
    torch.manual_seed(0)
    cell = SmallCell(4, tuple_state=tuple_state).to(device=device, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64).to(device)
    zshape = (2, 4, 6, 6)
    z0: Any = (
        (torch.zeros(zshape, dtype=torch.float64, device=device),) * 2
        if tuple_state
        else torch.zeros_like(x)
    )
    w = torch.randn(2 if tuple_state else 1, *zshape, generator=gen, dtype=torch.float64).to(device)
    params = list(cell.parameters())
    out = []
    for grad in ("upg", "ift"):
        opts = dict(solver="anderson", iters=100, grad=grad, k=k, lam=lam, bwd_iters=100, tol=1e-12)
        ours = make_ours(cell, **opts)  # type: ignore[arg-type]
        theirs = make_td(get_deq, **opts)
        grads = []
        residual = {}
        for lib, deq in (("ours", ours), ("torchdeq", theirs)):
            for p in params:
                p.grad = None
            if lib == "ours":
                z, info = deq(z0, x)
                residual[lib] = float(info.rel_residual.max())
            else:
                if tuple_state:
                    z_out, info = deq(
                        lambda *zs: cell(zs, x), list(z0), solver_kwargs=dict(TD_SOLVER_KW)
                    )
                else:
                    z_out, info = deq(lambda z: cell(z, x), z0, solver_kwargs=dict(TD_SOLVER_KW))
                z = z_out[-1]
                residual[lib] = float(info["rel_lowest"].max())
            zs = tuple(z) if isinstance(z, list | tuple) else (z,)
            loss = sum((wi * zi).sum() for wi, zi in zip(w, zs))
            loss.backward()
            grads.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                        for p in params
                    ]
                )
            )
        g_ours, g_td = grads
        out.append(
            {
                "state": "tuple" if tuple_state else "tensor",
                "ours": f"UPG(k={k}, lam={lam})" if grad == "upg" else "IFT(Anderson)",
                "torchdeq": f"grad={k}, tau={lam}"
                if grad == "upg"
                else "ift=True (b_solver anderson)",
                "cosine": float(F.cosine_similarity(g_ours, g_td, dim=0)),
                "rel_error": float((g_ours - g_td).norm() / g_td.norm().clamp_min(1e-300)),
                "forward_rel_residual": residual,
                "dtype": "float64",
            }
        )
    return out


# --------------------------------------------------------------------------- (b) timing


def timing(
    get_deq: Any,
    *,
    kind: str,
    solvers: tuple[str, ...],
    args: argparse.Namespace,
    device: torch.device,
) -> list[dict[str, Any]]:
    sync = device.type == "cuda"
    prob = Problem(
        kind,
        batch=args.batch,
        size=args.size,
        dtype=torch.float32,
        device=device,
        channels=args.channels,
    )
    records = []
    for solver in solvers:
        fns: dict[str, Callable[[], object]] = {}
        for grad in ("upg", "ift"):
            opts = dict(
                solver=solver,
                iters=args.iters,
                grad=grad,
                k=args.k,
                lam=args.lam,
                bwd_iters=args.bwd_iters,
            )
            theirs = make_td(get_deq, **opts)
            fns[f"torchdeq/{grad}/step"] = lambda d=theirs: prob.step("torchdeq", d)
            for mode in args.modes:
                ours = _ours(prob.cell, mode, opts)
                fns[f"ours_{mode}/{grad}/step"] = lambda d=ours: prob.step("ours", d)
            if grad == "upg":  # the forward solve does not depend on the gradient
                theirs_e = make_td(get_deq, **opts).eval()
                fns["torchdeq/solve"] = lambda d=theirs_e: prob.solve("torchdeq", d)
                for mode in args.modes:
                    ours_e = _ours(prob.cell, mode, opts, train=False)
                    fns[f"ours_{mode}/solve"] = lambda d=ours_e: prob.solve("ours", d)
        load0 = loadavg()
        med = interleaved_medians(fns, repeats=args.repeats, warmup=args.warmup, sync=sync)
        rec: dict[str, Any] = {
            "model": kind,
            "solver": solver,
            "load_before": load0,
            "load_after": loadavg(),
        }
        for key, v in med.items():
            rec[key.replace("/", "_") + "_ms"] = v * 1e3
        for mode in args.modes:
            suffix = "" if mode == "eager" else f"_{mode}"
            rec[f"solve_ratio{suffix}"] = med[f"ours_{mode}/solve"] / med["torchdeq/solve"]
            rec[f"upg_step_ratio{suffix}"] = med[f"ours_{mode}/upg/step"] / med["torchdeq/upg/step"]
            rec[f"ift_step_ratio{suffix}"] = med[f"ours_{mode}/ift/step"] / med["torchdeq/ift/step"]
            # the eager keys keep their old names (ours_solve_ms, ...)
            if mode == "eager":
                for part in ("solve", "upg_step", "ift_step"):
                    rec[f"ours_{part}_ms"] = rec[f"ours_eager_{part}_ms"]
            print(
                f"  {kind}/{solver}/{mode}: solve {rec[f'solve_ratio{suffix}']:.2f}  upg step "
                f"{rec[f'upg_step_ratio{suffix}']:.2f}  ift step {rec[f'ift_step_ratio{suffix}']:.2f}",
                file=sys.stderr,
                flush=True,
            )
        records.append(rec)
    return records


def _ours(cell: nn.Module, mode: str, opts: dict[str, Any], *, train: bool = True) -> Any:
    """phantomdeq's DEQ for ``mode``: eager, compiled (``torch.compile`` of the module) or with
    its forward solve replayed from a CUDA graph."""
    deq = make_ours(cell, cuda_graph=mode == "graph", **opts)
    deq.train(train)
    return torch.compile(deq) if mode == "compile" else deq


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, help="image side (32: CIFAR)")
    ap.add_argument("--channels", type=int, default=24, help="conv cell channels")
    ap.add_argument("--iters", type=int, default=22, help="forward budget (NFE)")
    ap.add_argument("--bwd-iters", type=int, default=20, help="IFT backward budget (NFE)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    ap.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma list of {SOLVERS}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--modes", default="eager", help="phantomdeq execution modes: eager,compile,graph (CUDA)"
    )
    ap.add_argument("--no-timing", action="store_true", help="gradient agreement only")
    ap.add_argument(
        "--quick", action="store_true", help="tiny smoke setting (batch 2, 8x8, 3 iterations)"
    )
    ap.add_argument("--out", default="benchmarks/results/vs_torchdeq.json")
    args = ap.parse_args(argv)
    get_deq = _import_torchdeq()
    if get_deq is None:
        print(
            "vs_torchdeq: skipped — TorchDEQ is not importable "
            "(install the peer extra: pip install --no-deps torchdeq==0.1.0)"
        )
        return 0
    args.modes = tuple(m for m in args.modes.split(",") if m)
    bad_modes = [m for m in args.modes if m not in ("eager", "compile", "graph")]
    if bad_modes or not args.modes:
        ap.error(f"--modes: allowed eager, compile, graph; got {args.modes}")
    if "graph" in args.modes and args.device != "cuda":
        ap.error("--modes graph needs --device cuda (CUDA graphs)")
    models = tuple(m for m in args.models.split(",") if m)
    solvers = tuple(s for s in args.solvers.split(",") if s)
    bad = [m for m in models if m not in MODELS] + [s for s in solvers if s not in SOLVERS]
    if bad:
        ap.error(
            f"unknown --models/--solvers entries {bad}; allowed models {MODELS}, solvers {SOLVERS}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available (allowed here: cpu)")
    for name in ("batch", "size", "channels", "iters", "bwd_iters", "k", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.batch, args.size, args.iters, args.bwd_iters = 2, 8, 3, 3
        args.repeats, args.warmup = 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    t0 = time.perf_counter()
    agree = []
    for tuple_state in (False, True):
        agree += agreement(get_deq, tuple_state=tuple_state, k=args.k, lam=args.lam, device=dev)
    print(
        "(a) gradient agreement: contractive conv cell, float64, forward/backward solved to 1e-12"
    )
    print_table(
        ["state", "phantomdeq", "TorchDEQ", "cosine", "rel. error", "fwd residual (ours, TD)"],
        [
            [
                a["state"],
                a["ours"],
                a["torchdeq"],
                f"{a['cosine']:.12f}",
                f"{a['rel_error']:.2e}",
                f"{a['forward_rel_residual']['ours']:.1e}, {a['forward_rel_residual']['torchdeq']:.1e}",
            ]
            for a in agree
        ],
    )
    timed: list[dict[str, Any]] = []
    if not args.no_timing:
        for kind in models:
            timed += timing(get_deq, kind=kind, solvers=solvers, args=args, device=dev)
        print(
            f"\n(b) time, phantomdeq / TorchDEQ (lower is better; goal <= 0.60 for the UPG and IFT steps on an H100, issue 13): batch {args.batch}, "
            f"{args.size}x{args.size}, forward {args.iters} NFE, UPG(k={args.k}, lam={args.lam}), "
            f"IFT backward {args.bwd_iters} NFE, {dev}, median of {args.repeats}"
        )
        rows = []
        for r in timed:
            for mode in args.modes:
                suffix = "" if mode == "eager" else f"_{mode}"
                rows.append(
                    [
                        r["model"],
                        r["solver"],
                        mode,
                        r[f"ours_{mode}_solve_ms"],
                        r["torchdeq_solve_ms"],
                        r[f"solve_ratio{suffix}"],
                        r[f"ours_{mode}_upg_step_ms"],
                        r["torchdeq_upg_step_ms"],
                        r[f"upg_step_ratio{suffix}"],
                        r[f"ours_{mode}_ift_step_ms"],
                        r["torchdeq_ift_step_ms"],
                        r[f"ift_step_ratio{suffix}"],
                    ]
                )
        print_table(
            [
                "model",
                "solver",
                "mode",
                "solve ms",
                "TD solve",
                "ratio",
                "UPG step",
                "TD UPG",
                "ratio",
                "IFT step",
                "TD IFT",
                "ratio",
            ],
            rows,
        )
    import torchdeq

    payload = {
        "machine": {**machine(), "loadavg_end": loadavg()},
        "torchdeq": getattr(torchdeq, "__version__", "0.1.0"),
        "args": vars(args),
        "agreement": agree,
        "timing": timed,
        "wall_s": time.perf_counter() - t0,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
