"""Synthetic setting of the paper (Sec. 3, "Precision of the Phantom Gradient", Fig. 1) and the
Theorem 1 descent check, computed by the library: every gradient by ``phantomdeq.DEQ`` with the
estimators of ``phantomdeq.grad``, every matrix and condition by ``phantomdeq.diagnostics``.
The command is ``phantomdeq synthetic --out DIR`` (:func:`main`; its flags are the fields of
:class:`SyntheticConfig`, ``--input-dim`` for ``input_dim`` ...; text and figures in
:mod:`.report`).

Setting. ``F(h, x) = σ(W h + U x + b)`` (:class:`~phantomdeq.models.synthetic.SyntheticF`) with
``W`` spectrally normalised so that ``F`` is ``L_h = 0.9``-Lipschitz in ``h``. Each *draw* is an
independent problem ``(W, U, b)``, input ``x`` and target ``y`` with loss
``L = ½‖h − y‖²``; all draws are one batch (batched weights, one sample per draw).

* ``h*``: ``pdq.solvers.FixedPoint`` (eq. 10) from ``h = 0``, at most ``max_iter`` updates,
  each draw stopped at its first iterate with ``‖h − F(h)‖/‖h‖ < tol`` (1e-5;
  ``freeze_converged=True``).
* Exact gradient ``dL/dθ`` (θ = W, U, b): ``pdq.grad.BPTT`` through those iterations,
  cross-validated by ``pdq.grad.IFT(solver=pdq.solvers.Broyden(max_iter=broyden_iter))``
  (eq. 4) after a plain ``FixedPoint(max_iter, tol)`` solve; their cosine is reported (the
  paper reports > 0.9999).
* Phantom gradients, for every ``k`` and ``λ``: ``pdq.grad.UPG(k, λ)`` (eq. 17) and
  ``pdq.grad.NPG(k, λ)`` (eq. 18) attached to the same solution by ``pdq.DEQ``: from the exact
  ``h*`` and, in the *inexact* variant, from an ``h̃`` stopped early at
  ``‖h − F(h)‖/‖h‖ < inexact_tol`` (1e-2); the reference is always the exact gradient.
* Theorem 1: ``pdq.diagnostics.unrolled_matrices`` / ``neumann_matrices`` (per draw, paper
  layout) and ``descent_conditions`` evaluate condition (6)
  ``‖A(I − ∂F/∂h) − ∂F/∂θ‖₂ ≤ σ_min²/σ_max`` with ``∂F/∂h``, ``∂F/∂θ`` at the exact ``h*``;
  ``κ = σ_max/σ_min`` of ``∂F/∂θ``. The explicit ``A`` applied to ``∂L/∂h`` must reproduce the
  autograd gradient (``explicit_vs_autograd_max_rel_err``).

Outputs: ``results.json`` (list of records), ``summary.json`` (configuration, BPTT-vs-IFT
cosine, solver statistics), ``fig1.png`` and ``fig1_error.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pydantic
import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor

import phantomdeq as pdq
from phantomdeq import diagnostics as D
from phantomdeq._progress import progress_bar
from phantomdeq.models.synthetic import ACTIVATIONS, SyntheticF

from .command import (
    Outputs,
    Parser,
    add_flags,
    config_from_flags,
    float_list,
    int_list,
    run_command,
    word_list,
)

__all__ = [
    "METHODS",
    "QUICK_ARGS",
    "SyntheticConfig",
    "SyntheticResult",
    "build_parser",
    "main",
    "run",
]

PROG = "phantomdeq synthetic"

METHODS = ("upg", "npg")
#: reduced settings for a quick look (used by ``phantomdeq demo``; a few seconds)
QUICK_ARGS: list[str] = ["--draws", "50", "--ks", "1,2,3,5,10", "--lams", "0.5,1", "--no-progress"]

Lam = Annotated[float, Field(gt=0.0, le=1.0)]
_STRICT = pydantic.ConfigDict(strict=True, allow_inf_nan=False)
_LIST = Field(min_length=1, strict=False)  # a non-empty tuple (a list is accepted)


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class SyntheticConfig:
    """Options of the synthetic experiment (the CLI flags, with the same names); invalid values
    raise ``ValueError`` naming the field."""

    draws: PositiveInt = 200
    hidden: PositiveInt = 20
    input_dim: PositiveInt = 10
    lipschitz: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    activation: str = "tanh"
    ks: Annotated[tuple[PositiveInt, ...], _LIST] = tuple(range(1, 11))
    lams: Annotated[tuple[Lam, ...], _LIST] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    methods: Annotated[tuple[str, ...], _LIST] = METHODS
    tol: PositiveFloat = 1e-5
    max_iter: PositiveInt = 100
    inexact_tol: PositiveFloat | None = 1e-2
    broyden_iter: PositiveInt = 20
    theorem: bool = True
    seed: int = 0

    @pydantic.field_validator("activation")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        if value not in ACTIVATIONS:
            raise ValueError(f"must be one of {', '.join(ACTIVATIONS)}")
        return value

    @pydantic.field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(m not in METHODS for m in value):
            raise ValueError(f"must be a subset of {', '.join(METHODS)}")
        return value

    def __post_init__(self) -> None:  # canonical, duplicate-free, sorted tuples
        object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        object.__setattr__(self, "lams", tuple(sorted({float(v) for v in self.lams})))
        object.__setattr__(self, "methods", tuple(m for m in METHODS if m in self.methods))


@dataclass
class SyntheticResult:
    """What :func:`run` returns: ``records`` (one per (method, k, lam, exact_solution), the
    rows of ``results.json``), the per-draw ``cosines`` behind each record under the same key,
    and ``summary`` (``summary.json``)."""

    config: SyntheticConfig
    records: list[dict[str, Any]]
    cosines: dict[tuple[str, int, float, bool], np.ndarray] = field(repr=False)
    summary: dict[str, Any]


class _Given:
    """A solver (the ``pdq.Solver`` protocol) that returns a solution found before: the phantom
    gradients of every (k, λ) are attached to the same ``h*`` (or ``h̃``)."""

    def __init__(self, solution: pdq.Solution) -> None:
        self.solution = solution

    def __call__(self, g: Any, z0: Any) -> pdq.Solution:
        return self.solution


def _loss(h: Tensor, target: Tensor) -> Tensor:
    """Sum over draws of ``½‖h − y‖²`` (draws have their own parameters: gradients per draw)."""
    return 0.5 * (h - target).pow(2).sum()


def _solve_stats(sol: pdq.Solution) -> dict[str, Any]:
    """Iterations (updates before the returned iterate) and residuals of a forward solve."""
    updates = (sol.nstep - 1).clamp_min(0).double()
    return {
        "iterations_mean": float(updates.mean()),
        "iterations_max": int(updates.max()),
        "rel_residual_mean": float(sol.rel_residual.mean()),
        "rel_residual_max": float(sol.rel_residual.max()),
        "converged": float(sol.converged.double().mean()),
    }


def _stats(cos: np.ndarray) -> dict[str, float]:
    return {
        "cos_mean": float(cos.mean()),
        "cos_median": float(np.median(cos)),
        "cos_p10": float(np.percentile(cos, 10)),
        "cos_p90": float(np.percentile(cos, 90)),
        "cos_min": float(cos.min()),
        "err_median": float(np.median(1.0 - cos)),
        "err_p90": float(np.percentile(1.0 - cos, 90)),
        "descent": float((cos > 0).mean()),
    }


_NO_THEOREM = dict.fromkeys(
    ("condition_holds", "kappa_mean", "kappa_max", "condition_ratio_median")
)


def _theorem1(
    rec: dict[str, Any], a: Tensor, star: tuple[Tensor, Tensor, Tensor], grad: Tensor, g: Tensor
) -> tuple[np.ndarray, float]:
    """Condition (6) per draw for the phantom matrix ``a`` into ``rec``; returns κ per draw and
    the largest relative difference between ``a`` applied to ``g = ∂L/∂h`` and the autograd
    gradient ``grad`` (the explicit matrix must reproduce it)."""
    cond = D.descent_conditions(a, *star[:2], svals=star[2])
    ratio = (cond["lhs"] / cond["rhs"]).numpy()
    kappa = cond["kappa"].numpy()
    rec["condition_holds"] = float((ratio <= 1.0).mean())
    rec["kappa_mean"] = float(kappa.mean())
    rec["kappa_max"] = float(kappa.max())
    rec["condition_ratio_median"] = float(np.median(ratio))
    explicit = torch.einsum("bpi,bi->bp", a, g)
    err = (explicit - grad).norm(dim=1) / grad.norm(dim=1).clamp_min(1e-300)
    return kappa, float(err.max())


class _Problem:
    """The draws and one ``DEQ`` whose solver and estimator are swapped per measurement."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        dt = torch.float64
        self.model = SyntheticF(
            cfg.hidden,
            cfg.input_dim,
            lipschitz=cfg.lipschitz,
            activation=cfg.activation,
            batch=cfg.draws,
            generator=gen,
            dtype=dt,
        )
        self.x = torch.randn(cfg.draws, cfg.input_dim, generator=gen, dtype=dt)
        self.target = torch.tanh(torch.randn(cfg.draws, cfg.hidden, generator=gen, dtype=dt))
        self.z0 = torch.zeros(cfg.draws, cfg.hidden, dtype=dt)
        self.params = list(self.model.parameters())
        self.forward = self.solver(cfg.tol, cfg.max_iter)
        self.deq = pdq.DEQ(self.model, solver=self.forward, grad=pdq.BPTT()).train()

    @staticmethod
    def solver(tol: float, max_iter: int) -> pdq.FixedPoint:
        """Every draw stops at its first iterate under ``tol``; ``max_iter`` counts updates
        here, evaluations of F in the library."""
        return pdq.FixedPoint(max_iter=max_iter + 1, tol=tol, freeze_converged=True)

    def solve(self, tol: float, max_iter: int) -> pdq.Solution:
        return self.solver(tol, max_iter)(lambda h: self.model(h, self.x), self.z0)

    def gradient(self, grad: pdq.GradientEstimator, solver: Any) -> tuple[Tensor, Tensor, Any]:
        """Per-draw parameter gradients ``(B, P)`` of the loss with estimator ``grad`` after
        ``solver``, the DEQ output's value (where ``∂L/∂h`` is taken) and the solution."""
        with self.deq.using(solver=solver, grad=grad):
            z, sol = self.deq(self.z0, self.x)
        grads = torch.autograd.grad(_loss(z, self.target), self.params)
        return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1), z.detach(), sol

    def paper_jacobians(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Per-draw ``∂F/∂h`` (B × d_h × d_h) and ``∂F/∂θ`` (B × P × d_h), paper layout."""
        J_h, J_t = D.per_sample_jacobians(self.model, h, (self.x,), self.params)
        return D.paper_layout(J_h), D.paper_layout(J_t)

    def matrices(self, method: str, h0: Tensor, lam: float, ks: tuple[int, ...]) -> dict:
        """The phantom matrices ``A`` (paper layout, per draw) for every k from ``h0``."""
        if method == "upg":
            return D.unrolled_matrices(
                self.model, h0, (self.x,), self.params, ks, lam, per_sample=True
            )
        return D.neumann_matrices(*self.paper_jacobians(h0), ks, lam)


def run(
    config: SyntheticConfig | None = None,
    *,
    progress: bool = False,
    threads: int | None = 1,
    **overrides: Any,
) -> SyntheticResult:
    """Run the experiment; ``overrides`` replace fields of ``config`` (default config if None).

    ``threads``: torch intra-op threads during the run (restored afterwards). The tensors are
    tiny (a few hundred draws × tens of dimensions), so extra threads only add overhead; on a
    shared machine they slowed the default run down by a factor of ~40. ``None`` leaves the
    setting alone.
    """
    cfg = config if config is not None else SyntheticConfig()
    unknown = sorted(set(overrides) - set(SyntheticConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; allowed: {', '.join(SyntheticConfig.__dataclass_fields__)}"
        )
    cfg = replace(cfg, **overrides) if overrides else cfg
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise TypeError(f"threads must be None or an integer >= 1, got {threads!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: SyntheticConfig, progress: bool) -> SyntheticResult:
    start = time.perf_counter()
    p = _Problem(cfg)
    variants = [True] + ([False] if cfg.inexact_tol is not None else [])
    total = 2 + len(variants) * len(cfg.lams) * len(cfg.methods)
    bar = progress_bar(enabled=progress, total=total, desc="synthetic")
    exact, h_star, sol_star = p.gradient(pdq.BPTT(), p.forward)
    bar.update(1)
    # the implicit gradient after a plain DEQ forward solve; a fixed backward budget whose
    # residual is reported
    ift = pdq.IFT(solver=pdq.Broyden(max_iter=cfg.broyden_iter, tol=1e-14), warn_unconverged=False)
    ift_grad, _, ift_sol = p.gradient(ift, pdq.FixedPoint(max_iter=cfg.max_iter, tol=cfg.tol))
    bptt_ift = D.per_sample_cosine(exact, ift_grad)
    back = ift.last_backward
    bar.update(1)
    solutions = {True: sol_star}
    if cfg.inexact_tol is not None:
        solutions[False] = p.solve(cfg.inexact_tol, cfg.max_iter)
    # ∂F/∂h, ∂F/∂θ at h* and the singular values of ∂F/∂θ (the same for every record)
    star = None
    if cfg.theorem:
        dfdh, dfdth = p.paper_jacobians(h_star)
        star = (dfdh, dfdth, torch.linalg.svdvals(dfdth))
    records: list[dict[str, Any]] = []
    cosines: dict[tuple[str, int, float, bool], np.ndarray] = {}
    kappa = np.zeros(0)
    explicit_err = 0.0
    for is_exact in variants:
        sol = solutions[is_exact]
        for method in cfg.methods:
            for lam in cfg.lams:
                mats = p.matrices(method, sol.z, lam, cfg.ks) if star is not None else {}
                for k in cfg.ks:
                    est = pdq.UPG(k=k, lam=lam) if method == "upg" else pdq.NPG(k=k, lam=lam)
                    grad, out, _ = p.gradient(est, _Given(sol))
                    cos = D.per_sample_cosine(grad, exact).numpy()
                    cosines[(method, k, lam, is_exact)] = cos
                    rec = {"method": method, "k": k, "lam": lam, "exact_solution": is_exact}
                    records.append({**rec, **_stats(cos), "draws": cfg.draws, **_NO_THEOREM})
                    if star is not None:
                        kappa, err = _theorem1(records[-1], mats[k], star, grad, out - p.target)
                        explicit_err = max(explicit_err, err)
                bar.update(1)
    bar.close()
    theorem = star is not None
    summary = {
        "config": {**asdict(cfg), "ks": list(cfg.ks), "lams": list(cfg.lams)},
        "loss": "0.5*||h - y||^2, y = tanh(N(0, I))",
        "theta": "W, U, b of F (the spectrally normalised W is a plain parameter)",
        "bptt_ift_cos_min": float(bptt_ift.min()),
        "bptt_ift_cos_mean": float(bptt_ift.mean()),
        "exact_solution": _solve_stats(sol_star),
        "inexact_solution": _solve_stats(solutions[False]) if False in solutions else None,
        "ift": {
            "forward_rel_residual_max": float(ift_sol.rel_residual.max()),
            "backward_iterations": None if back is None else int(back.niter),
            "backward_abs_residual_max": None if back is None else float(back.abs_residual.max()),
        },
        "spectral_norm_W_max": float(
            torch.linalg.matrix_norm(p.model.weight.detach(), ord=2).max()
        ),
        "kappa_mean": float(kappa.mean()) if theorem else None,
        "kappa_median": float(np.median(kappa)) if theorem else None,
        "kappa_max": float(kappa.max()) if theorem else None,
        "explicit_vs_autograd_max_rel_err": explicit_err if theorem else None,
        "seconds": time.perf_counter() - start,
    }
    return SyntheticResult(config=cfg, records=records, cosines=cosines, summary=summary)


# --------------------------------------------------------------------------- command

#: flag -> (type, help); the defaults and the allowed values come from SyntheticConfig
_FLAGS: dict[str, tuple[Any, str]] = {
    "draws": (int, "independent draws (problem, input, target)"),
    "hidden": (int, "dimension of h"),
    "input_dim": (int, "dimension of x"),
    "lipschitz": (float, "L_h of F in h, in (0, 1)"),
    "activation": (str, "the activation σ: tanh, sigmoid or relu"),
    "ks": (int_list, "unrolling/Neumann steps, e.g. 1-10 or 1,2,5"),
    "lams": (float_list, "damping λ values in (0, 1], comma-separated"),
    "methods": (word_list, "comma-separated subset of upg,npg"),
    "tol": (float, "rel. residual defining the exact h*"),
    "max_iter": (int, "fixed-point updates at most"),
    "inexact_tol": (float, "rel. residual at which the inexact h~ is stopped"),
    "broyden_iter": (int, "Broyden iterations of the IFT check"),
    "seed": (int, "seed of the draws"),
}


def build_parser() -> Parser:
    p = Parser(
        PROG,
        "Paper Fig. 1: cosine similarity of the unrolled (UPG) and Neumann (NPG) phantom "
        "gradients to the exact gradient on F(h, x) = act(W h + U x + b) with Lipschitz "
        "constant L_h in h, plus the Theorem 1 descent-condition check.",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    add_flags(p, _FLAGS, SyntheticConfig())
    p.add_argument("--no-inexact", action="store_true", help="skip the inexact-solution variant")
    p.add_argument("--no-theorem", action="store_true", help="skip the Theorem 1 matrix check")
    p.add_argument(
        "--fig",
        type=Path,
        default=None,
        help="where to write the figure (default OUT/fig1.png; the log-scale companion goes "
        "next to it with the suffix _error)",
    )
    p.add_argument("--no-figure", action="store_true", help="do not write the figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _command(args: argparse.Namespace) -> int:
    from .report import synthetic_error_figure, synthetic_figure, synthetic_table

    options = {name: getattr(args, name) for name in _FLAGS}
    if args.no_inexact:
        options["inexact_tol"] = None
    cfg = config_from_flags(SyntheticConfig, **options, theorem=not args.no_theorem)
    outputs = Outputs(args.out)
    result = run(cfg, progress=not args.no_progress)
    outputs.json("results.json", result.records, indent=1)
    outputs.json("summary.json", result.summary, indent=1)
    if not args.no_figure:
        fig: Path = args.fig if args.fig is not None else args.out / "fig1.png"
        outputs.figure(fig, lambda path: synthetic_figure(result, path))
        error_fig = fig.with_name(f"{fig.stem}_error{fig.suffix}")
        outputs.figure(error_fig, lambda path: synthetic_error_figure(result, path))
    print(synthetic_table(result))
    outputs.report()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``phantomdeq synthetic``: returns 0 on success, 2 for invalid options."""
    return run_command(build_parser(), _command, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
