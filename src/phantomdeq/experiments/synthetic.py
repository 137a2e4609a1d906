"""Synthetic setting of the paper (Sec. 3, "Precision of the Phantom Gradient", Fig. 1) and the
Theorem 1 descent check, as the command ``phantomdeq synthetic --out DIR``.

Setting. ``F(h, x) = σ(W h + U x + b)`` (:class:`~phantomdeq.models.synthetic.SyntheticF`) with
``W`` spectrally normalised so that ``F`` is ``L_h = 0.9``-Lipschitz in ``h``. Each *draw* is an
independent problem ``(W, U, b)``, input ``x`` and target ``y`` with loss
``L = ½‖h − y‖²``; all draws are solved at once (batched weights).

* ``h*``: fixed-point iteration (eq. 10) from ``h = 0``, at most ``max_iter`` (100) updates, until
  ``‖h − F(h)‖/‖h‖ < tol`` (1e-5), per draw.
* Exact gradient ``dL/dθ`` (θ = W, U, b): back-propagation through those iterations (BPTT),
  cross-validated by the implicit gradient of eq. (4) solved with 20 Broyden iterations
  (``phantomdeq.grad.IFT(solver=phantomdeq.solvers.Broyden(max_iter=20))``); their cosine is
  reported (the paper reports > 0.9999).
* Phantom gradients, for every ``k`` and ``λ``: UPG (eq. 17), back-propagation through ``k``
  damped steps ``h_{t+1} = λF(h_t) + (1 − λ)h_t`` from the detached solution, output ``h_k``;
  NPG (eq. 18), ``λ ∂F/∂θ Σ_{j<k} Bʲ`` at the solution, output ``F(h)`` — exactly what
  ``phantomdeq.grad.UPG``/``NPG`` attach in a ``phantomdeq.DEQ`` (the tests check that).
  Both are evaluated from the exact ``h*`` and, in the *inexact* variant, from an ``h̃`` stopped
  early at ``‖h − F(h)‖/‖h‖ < inexact_tol`` (1e-2); the reference is always the exact gradient.
* Theorem 1: with explicit matrices (paper layout, ``∂F/∂θ`` is ``d_θ × d_h``) the condition (6)
  ``‖A(I − ∂F/∂h) − ∂F/∂θ‖₂ ≤ σ_min²/σ_max`` is evaluated per draw, with ``A`` the phantom
  Jacobian (eq. 17 along the actual trajectory, eq. 18 at the starting point) and ``∂F/∂h``,
  ``∂F/∂θ`` at the exact ``h*``; ``σ_min`` is the smallest of the ``d_h`` singular values of the
  rank-``d_h`` matrix ``∂F/∂θ``, ``κ = σ_max/σ_min``.

Outputs in ``--out``: ``results.json`` (list of records), ``summary.json`` (configuration,
BPTT-vs-IFT cosine, solver statistics), ``fig1.png``; a table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from phantomdeq.models.synthetic import ACTIVATIONS, SyntheticF

__all__ = [
    "METHODS",
    "QUICK_ARGS",
    "SyntheticConfig",
    "SyntheticResult",
    "format_table",
    "main",
    "run",
    "write_error_figure",
    "write_figure",
]

METHODS = ("upg", "npg")
DEFAULT_KS = tuple(range(1, 11))
DEFAULT_LAMS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
#: reduced settings for a quick look (used by ``phantomdeq demo``; a few seconds)
QUICK_ARGS: list[str] = ["--draws", "50", "--ks", "1,2,3,5,10", "--lams", "0.5,1", "--no-progress"]


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (
        isinstance(value, int | float | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


@dataclass(frozen=True)
class SyntheticConfig:
    """Options of the synthetic experiment (the CLI flags, with the same names)."""

    draws: int = 200
    hidden: int = 20
    input_dim: int = 10
    lipschitz: float = 0.9
    activation: str = "tanh"
    ks: tuple[int, ...] = DEFAULT_KS
    lams: tuple[float, ...] = DEFAULT_LAMS
    methods: tuple[str, ...] = METHODS
    tol: float = 1e-5
    max_iter: int = 100
    inexact_tol: float | None = 1e-2
    broyden_iter: int = 20
    theorem: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("draws", "hidden", "input_dim", "max_iter", "broyden_iter"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not _is_real(self.lipschitz) or not 0.0 < self.lipschitz < 1.0:
            raise ValueError(f"lipschitz must be in (0, 1) (a contraction), got {self.lipschitz!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}"
            )
        ks, lams, methods = tuple(self.ks), tuple(self.lams), tuple(self.methods)
        if not ks or any(not _is_int(k) or k < 1 for k in ks):
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {self.ks!r}")
        if not lams or any(not _is_real(lam) or not 0.0 < lam <= 1.0 for lam in lams):
            raise ValueError(
                f"lams must be a non-empty list of numbers in (0, 1], got {self.lams!r}"
            )
        if not methods or any(m not in METHODS for m in methods):
            raise ValueError(
                f"methods must be a non-empty subset of {METHODS}, got {self.methods!r}"
            )
        if not _is_real(self.tol) or self.tol <= 0:
            raise ValueError(f"tol must be a number > 0, got {self.tol!r}")
        if self.inexact_tol is not None and (
            not _is_real(self.inexact_tol) or not self.inexact_tol > 0
        ):
            raise ValueError(f"inexact_tol must be None or a number > 0, got {self.inexact_tol!r}")
        # canonical, duplicate-free, sorted tuples
        object.__setattr__(self, "ks", tuple(sorted({int(k) for k in ks})))
        object.__setattr__(self, "lams", tuple(sorted({float(lam) for lam in lams})))
        object.__setattr__(self, "methods", tuple(m for m in METHODS if m in methods))


@dataclass
class SyntheticResult:
    """What :func:`run` returns.

    ``records``: one dict per (method, k, lam, exact_solution) — the content of ``results.json``.
    ``cosines``: the per-draw cosines behind each record, keyed by
    ``(method, k, lam, exact_solution)``. ``summary``: configuration, BPTT-vs-IFT cosine and
    solver statistics (``summary.json``).
    """

    config: SyntheticConfig
    records: list[dict[str, Any]]
    cosines: dict[tuple[str, int, float, bool], np.ndarray] = field(repr=False)
    summary: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """Per-draw flat gradient ``[B, P]`` from per-parameter gradients of batched parameters."""
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(p.shape[0], -1)
            for g, p in zip(grads, params)
        ],
        dim=1,
    )


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of ``[B, P]`` tensors (0 where a row is zero)."""
    num = (a * b).sum(dim=1)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def _loss(h: Tensor, target: Tensor) -> Tensor:
    """Sum over draws of ``½‖h − y‖²`` (draws have their own parameters, so grads stay per draw)."""
    return 0.5 * (h - target).pow(2).sum()


def _fixed_point(
    model: SyntheticF, x: Tensor, *, tol: float, max_iter: int
) -> tuple[Tensor, dict[str, Any]]:
    """Fixed-point iteration ``h ← F(h)`` (eq. 10) from ``h = 0``, per draw until
    ``‖h − F(h)‖/‖h‖ < tol`` or ``max_iter`` updates; recorded by autograd when grad is enabled
    (then back-propagating through the result is BPTT through exactly these iterations)."""
    b = x.shape[0]
    h = torch.zeros(b, model.hidden, dtype=x.dtype)
    done = torch.zeros(b, dtype=torch.bool)
    nstep = torch.zeros(b, dtype=torch.long)
    res = torch.full((b,), math.inf, dtype=x.dtype)
    for t in range(max_iter + 1):
        fh = model(h, x)
        with torch.no_grad():
            r = (fh - h).norm(dim=1) / (h.norm(dim=1) + 1e-12)
            res = torch.where(done, res, r)
            done = done | (r < tol)
        if bool(done.all()) or t == max_iter:
            break
        h = torch.where(done[:, None], h, fh)
        nstep += (~done).long()
    stats = {
        "iterations_mean": float(nstep.double().mean()),
        "iterations_max": int(nstep.max()),
        "rel_residual_mean": float(res.mean()),
        "rel_residual_max": float(res.max()),
        "converged": float(done.double().mean()),
    }
    return h, stats


def _ift_gradient(
    model: SyntheticF, x: Tensor, target: Tensor, cfg: SyntheticConfig
) -> tuple[Tensor, dict[str, Any]]:
    """Exact gradient by the library: ``DEQ`` forward (same fixed-point iteration and stopping
    rule), backward by ``IFT`` solved with ``Broyden(max_iter=broyden_iter)`` (eq. 4)."""
    from phantomdeq import grad as pdq_grad
    from phantomdeq import solvers as pdq_solvers
    from phantomdeq.deq import DEQ

    ift = pdq_grad.IFT(solver=pdq_solvers.Broyden(max_iter=cfg.broyden_iter, tol=1e-14))
    deq = DEQ(
        model,
        solver=pdq_solvers.FixedPoint(max_iter=cfg.max_iter, tol=cfg.tol, stop="rel"),
        grad=ift,
    )
    deq.train()
    params = list(model.parameters())
    z, info = deq(torch.zeros(x.shape[0], model.hidden, dtype=x.dtype), x)
    grads = torch.autograd.grad(_loss(z, target), params)
    back = ift.last_backward
    stats = {
        "forward_rel_residual_max": float(info.rel_residual.max()),
        "backward_iterations": None if back is None else int(back.niter),
        "backward_abs_residual_max": None if back is None else float(back.abs_residual.max()),
    }
    return _flat(grads, params).detach(), stats


def _upg_gradients(
    model: SyntheticF, x: Tensor, target: Tensor, h0: Tensor, lam: float, ks: Sequence[int]
) -> dict[int, Tensor]:
    """UPG (eq. 17) for every k in ``ks``: back-propagate ``L(h_k)`` through k damped steps
    ``h_{t+1} = λF(h_t) + (1 − λ)h_t`` from the detached ``h_0`` (what ``grad.UPG`` attaches)."""
    params = list(model.parameters())
    out: dict[int, Tensor] = {}
    with torch.enable_grad():
        h = h0.detach()
        traj = [h]
        for _ in range(max(ks)):
            h = lam * model(h, x) + (1.0 - lam) * h
            traj.append(h)
        for k in ks:
            grads = torch.autograd.grad(_loss(traj[k], target), params, retain_graph=True)
            out[k] = _flat(grads, params)
    return out


def _npg_gradients(
    model: SyntheticF, x: Tensor, target: Tensor, h0: Tensor, lam: float, ks: Sequence[int]
) -> dict[int, Tensor]:
    """NPG (eq. 18) for every k in ``ks``: output ``y = F(h_0)``, ``g = dL/dy``, gradient
    ``λ (∂F/∂θ)ᵀ Σ_{j<k} (Bᵀ)ʲ g`` with ``B = λ ∂F/∂h + (1 − λ)I`` at ``h_0`` (vector-Jacobian
    products; what ``grad.NPG`` attaches)."""
    params = list(model.parameters())
    out: dict[int, Tensor] = {}
    with torch.enable_grad():
        h = h0.detach().requires_grad_(True)
        y = model(h, x)
        g = (y - target).detach()
        w, acc = g, g.clone()
        for j in range(1, max(ks) + 1):
            if j in ks:
                grads = torch.autograd.grad(y, params, lam * acc, retain_graph=True)
                out[j] = _flat(grads, params)
            if j == max(ks):
                break
            (jw,) = torch.autograd.grad(y, h, w, retain_graph=True)
            w = lam * jw + (1.0 - lam) * w
            acc = acc + w
    return out


def _jacobians(model: SyntheticF, h: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense per-draw Jacobians at ``h`` (standard layout): ``J_h = ∂F/∂h`` ``[B, d_h, d_h]``,
    ``J_θ = ∂F/∂θ`` ``[B, d_h, P]``, and ``F(h)``; by ``d_h`` batched vector-Jacobian products."""
    params = list(model.parameters())
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        y = model(hh, x)
        rows_h, rows_t = [], []
        eye = torch.eye(model.hidden, dtype=h.dtype)
        for i in range(model.hidden):
            e = eye[i].expand_as(y)
            gh, *gt = torch.autograd.grad(y, [hh, *params], e, retain_graph=True)
            rows_h.append(gh)
            rows_t.append(_flat(gt, params))
    return torch.stack(rows_h, 1), torch.stack(rows_t, 1), y.detach()


def _upg_matrices(
    model: SyntheticF, x: Tensor, h0: Tensor, lam: float, ks: Sequence[int]
) -> dict[int, Tensor]:
    """Explicit ``∂h_k/∂θ`` ``[B, d_h, P]`` of the damped unrolling (the transpose of
    ``A^unr_{k,λ}``, eq. 17), by the recursion ``A_{t+1} = λJ_θ(h_t) + (λJ_h(h_t) + (1−λ)I)A_t``,
    ``A_0 = 0``, along the actual trajectory from ``h_0``."""
    eye = torch.eye(model.hidden, dtype=h0.dtype)
    h = h0.detach()
    a: Tensor | None = None
    out: dict[int, Tensor] = {}
    for t in range(1, max(ks) + 1):
        jh, jt, fh = _jacobians(model, h, x)
        step = lam * jt
        a = step if a is None else step + torch.bmm(lam * jh + (1.0 - lam) * eye, a)
        h = lam * fh + (1.0 - lam) * h
        if t in ks:
            out[t] = a
    return out


def _npg_matrices(
    model: SyntheticF, x: Tensor, h0: Tensor, lam: float, ks: Sequence[int]
) -> dict[int, Tensor]:
    """Explicit transpose of ``A^neu_{k,λ} = λ ∂F/∂θ Σ_{j<k} Bʲ`` (eq. 18) at ``h_0``:
    ``λ Σ_{j<k} Bʲ J_θ`` ``[B, d_h, P]`` with ``B = λJ_h + (1 − λ)I`` (standard layout)."""
    eye = torch.eye(model.hidden, dtype=h0.dtype)
    jh, jt, _ = _jacobians(model, h0, x)
    bmat = lam * jh + (1.0 - lam) * eye
    term, acc = jt, jt.clone()
    out: dict[int, Tensor] = {}
    for j in range(1, max(ks) + 1):
        if j in ks:
            out[j] = lam * acc
        term = torch.bmm(bmat, term)
        acc = acc + term
    return out


def _spectral_norm_wide(m: Tensor) -> Tensor:
    """``‖M‖₂`` of each ``[d_h, P]`` matrix via the small Gram matrix ``M Mᵀ``."""
    gram = torch.bmm(m, m.transpose(1, 2))
    return torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt()


def _theorem1(a_std: Tensor, jh: Tensor, jt: Tensor) -> tuple[Tensor, Tensor]:
    """Condition (6) per draw. In paper layout ``A(I − ∂F/∂h) − ∂F/∂θ`` is the transpose of
    ``(I − J_h)A_std − J_θ`` (standard layout), so both have the same spectral norm.
    Returns (lhs, rhs) with rhs = σ_min²/σ_max of ``∂F/∂θ``."""
    eye = torch.eye(jh.shape[-1], dtype=jh.dtype)
    lhs = _spectral_norm_wide(torch.bmm(eye - jh, a_std) - jt)
    sv = torch.linalg.eigvalsh(torch.bmm(jt, jt.transpose(1, 2))).clamp_min(0).sqrt()
    return lhs, sv[:, 0] ** 2 / sv[:, -1]


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

    Returns a :class:`SyntheticResult` whose ``records`` are the rows of ``results.json``.
    """
    cfg = config if config is not None else SyntheticConfig()
    if overrides:
        unknown = sorted(set(overrides) - set(SyntheticConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown}; allowed: {', '.join(SyntheticConfig.__dataclass_fields__)}"
            )
        cfg = replace(cfg, **overrides)
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: SyntheticConfig, progress: bool) -> SyntheticResult:
    from tqdm import tqdm

    start = time.perf_counter()
    dtype = torch.float64
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SyntheticF(
        cfg.hidden,
        cfg.input_dim,
        lipschitz=cfg.lipschitz,
        activation=cfg.activation,
        batch=cfg.draws,
        generator=gen,
        dtype=dtype,
    )
    x = torch.randn(cfg.draws, cfg.input_dim, generator=gen, dtype=dtype)
    target = torch.tanh(torch.randn(cfg.draws, cfg.hidden, generator=gen, dtype=dtype))
    params = list(model.parameters())

    variants = [True] + ([False] if cfg.inexact_tol is not None else [])
    steps_total = 2 + len(variants) * len(cfg.lams) * len(cfg.methods)
    bar = tqdm(total=steps_total, desc="synthetic", file=sys.stderr, disable=not progress)

    # exact solution and exact gradient: BPTT through the fixed-point iterations
    with torch.enable_grad():
        h_bptt, exact_stats = _fixed_point(model, x, tol=cfg.tol, max_iter=cfg.max_iter)
        exact = _flat(torch.autograd.grad(_loss(h_bptt, target), params), params).detach()
    h_star = h_bptt.detach()
    bar.update(1)
    ift, ift_stats = _ift_gradient(model, x, target, cfg)
    bptt_ift = _cosine(exact, ift)
    bar.update(1)

    jh_star = jt_star = None
    if cfg.theorem:
        jh_star, jt_star, _ = _jacobians(model, h_star, x)
        sv = torch.linalg.eigvalsh(torch.bmm(jt_star, jt_star.transpose(1, 2))).clamp_min(0).sqrt()
        kappa = (sv[:, -1] / sv[:, 0]).numpy()

    solutions: dict[bool, Tensor] = {True: h_star}
    inexact_stats = None
    if cfg.inexact_tol is not None:
        with torch.no_grad():
            solutions[False], inexact_stats = _fixed_point(
                model, x, tol=cfg.inexact_tol, max_iter=cfg.max_iter
            )

    records: list[dict[str, Any]] = []
    cosines: dict[tuple[str, int, float, bool], np.ndarray] = {}
    explicit_err = 0.0
    for is_exact in variants:
        h0 = solutions[is_exact]
        for method in cfg.methods:
            for lam in cfg.lams:
                if method == "upg":
                    grads = _upg_gradients(model, x, target, h0, lam, cfg.ks)
                else:
                    grads = _npg_gradients(model, x, target, h0, lam, cfg.ks)
                mats: dict[int, Tensor] | None = None
                outs: dict[int, Tensor] = {}
                if cfg.theorem:
                    build = _upg_matrices if method == "upg" else _npg_matrices
                    mats = build(model, x, h0, lam, cfg.ks)
                    if method == "upg":
                        outs = _upg_outputs(model, x, h0, lam, cfg.ks)
                    else:
                        outs = dict.fromkeys(cfg.ks, model(h0, x).detach())
                for k in cfg.ks:
                    cos = _cosine(grads[k], exact).numpy()
                    cosines[(method, k, lam, is_exact)] = cos
                    rec: dict[str, Any] = {
                        "method": method,
                        "k": k,
                        "lam": lam,
                        "exact_solution": is_exact,
                        **_stats(cos),
                        "draws": cfg.draws,
                        "condition_holds": None,
                        "kappa_mean": None,
                        "kappa_max": None,
                        "condition_ratio_median": None,
                    }
                    if mats is not None and jh_star is not None and jt_star is not None:
                        lhs, rhs = _theorem1(mats[k], jh_star, jt_star)
                        ratio = (lhs / rhs).numpy()
                        rec["condition_holds"] = float((ratio <= 1.0).mean())
                        rec["kappa_mean"] = float(kappa.mean())
                        rec["kappa_max"] = float(kappa.max())
                        rec["condition_ratio_median"] = float(np.median(ratio))
                        # consistency: the explicit A applied to g equals the autograd gradient
                        g = outs[k] - target
                        explicit = torch.einsum("bip,bi->bp", mats[k], g)
                        scale = grads[k].norm(dim=1).clamp_min(1e-300)
                        explicit_err = max(
                            explicit_err,
                            float(((explicit - grads[k]).norm(dim=1) / scale).max()),
                        )
                    records.append(rec)
                bar.update(1)
    bar.close()
    summary = {
        "config": {**asdict(cfg), "ks": list(cfg.ks), "lams": list(cfg.lams)},
        "loss": "0.5*||h - y||^2, y = tanh(N(0, I))",
        "theta": "W, U, b of F (the spectrally normalised W is a plain parameter)",
        "bptt_ift_cos_min": float(bptt_ift.min()),
        "bptt_ift_cos_mean": float(bptt_ift.mean()),
        "exact_solution": exact_stats,
        "inexact_solution": inexact_stats,
        "ift": ift_stats,
        "spectral_norm_W_max": float(torch.linalg.matrix_norm(model.weight.detach(), ord=2).max()),
        "kappa_mean": None if not cfg.theorem else float(kappa.mean()),
        "kappa_median": None if not cfg.theorem else float(np.median(kappa)),
        "kappa_max": None if not cfg.theorem else float(kappa.max()),
        "explicit_vs_autograd_max_rel_err": explicit_err if cfg.theorem else None,
        "seconds": time.perf_counter() - start,
    }
    return SyntheticResult(config=cfg, records=records, cosines=cosines, summary=summary)


def _upg_outputs(
    model: SyntheticF, x: Tensor, h0: Tensor, lam: float, ks: Sequence[int]
) -> dict[int, Tensor]:
    """The UPG outputs ``h_k`` (values only), where ``g = dL/dh`` is evaluated."""
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        h = h0
        for t in range(1, max(ks) + 1):
            h = lam * model(h, x) + (1.0 - lam) * h
            if t in ks:
                out[t] = h
    return out


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------


def format_table(result: SyntheticResult) -> str:
    """The terminal report: BPTT-vs-IFT cosine, solver statistics, and per (variant, method) grids
    (rows λ, columns k) of mean / p10 / p90 cosine and of the Theorem 1 shares."""
    cfg, s = result.config, result.summary
    lines = [
        f"BPTT vs IFT (Broyden, {cfg.broyden_iter} it) cosine over {cfg.draws} draws: "
        f"min {s['bptt_ift_cos_min']:.8f}  mean {s['bptt_ift_cos_mean']:.8f}",
        f"exact h*: {s['exact_solution']['iterations_mean']:.1f} iterations on average "
        f"(max {s['exact_solution']['iterations_max']}), rel. residual max "
        f"{s['exact_solution']['rel_residual_max']:.2e}, converged "
        f"{100 * s['exact_solution']['converged']:.0f}% (tol {cfg.tol:g})",
    ]
    if s["inexact_solution"] is not None:
        ie = s["inexact_solution"]
        lines.append(
            f"inexact h~: {ie['iterations_mean']:.1f} iterations on average, rel. residual mean "
            f"{ie['rel_residual_mean']:.2e} (tol {cfg.inexact_tol:g})"
        )
    if s["kappa_mean"] is not None:
        lines.append(
            f"kappa(dF/dtheta) at h*: mean {s['kappa_mean']:.3f}, median "
            f"{s['kappa_median']:.3f}, max {s['kappa_max']:.3f}"
        )
    by_key = {(r["method"], r["k"], r["lam"], r["exact_solution"]): r for r in result.records}
    head = "lam\\k " + "".join(f"{k:>10d}" for k in cfg.ks)
    variants = [True] + ([False] if cfg.inexact_tol is not None else [])
    for is_exact in variants:
        for method in cfg.methods:
            sol = "exact h*" if is_exact else f"inexact h~ (tol {cfg.inexact_tol:g})"
            blocks = [
                ("cosine to exact gradient, mean", "cos_mean", ".4f"),
                ("cosine, p10", "cos_p10", ".4f"),
                ("cosine, p90", "cos_p90", ".4f"),
                ("1 - cosine, median", "err_median", ".2e"),
            ]
            for label, key, fmt in blocks:
                lines.append("")
                lines.append(f"{method.upper()}, {sol}: {label}")
                lines.append(head)
                for lam in cfg.lams:
                    row = "".join(
                        f"{by_key[(method, k, lam, is_exact)][key]:>10{fmt}}" for k in cfg.ks
                    )
                    lines.append(f"{lam:<6g}{row}")
            lines.append("")
            lines.append(
                f"{method.upper()}, {sol}: share of draws with condition (6) holding / descent"
            )
            lines.append(head)
            for lam in cfg.lams:
                cells = []
                for k in cfg.ks:
                    r = by_key[(method, k, lam, is_exact)]
                    c = "  -" if r["condition_holds"] is None else f"{r['condition_holds']:.2f}"
                    cells.append(f"{c}/{r['descent']:.2f}".rjust(10))
                lines.append(f"{lam:<6g}" + "".join(cells))
    lines.append("")
    lines.append(f"run time {s['seconds']:.1f} s")
    return "\n".join(lines)


def write_figure(result: SyntheticResult, path: str | Path) -> Path:
    """Fig. 1 layout: one panel per (method, solution variant) × λ, violins of the per-draw
    cosine similarity against the exact gradient along k, with the mean marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    variants = [True] + ([False] if cfg.inexact_tol is not None else [])
    rows = [(m, v) for v in variants for m in cfg.methods]
    ncols = len(cfg.lams)
    fig, axes = plt.subplots(
        len(rows),
        ncols,
        figsize=(2.3 * ncols + 1.0, 2.1 * len(rows) + 0.6),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    colors = {"upg": "tab:blue", "npg": "tab:orange"}
    lo = min(float(c.min()) for c in result.cosines.values())
    for i, (method, is_exact) in enumerate(rows):
        for j, lam in enumerate(cfg.lams):
            ax = axes[i][j]
            data = [result.cosines[(method, k, lam, is_exact)] for k in cfg.ks]
            parts = ax.violinplot(
                data, positions=list(cfg.ks), widths=0.8, showextrema=False, showmedians=False
            )
            for body in parts["bodies"]:  # type: ignore[attr-defined]
                body.set_facecolor(colors[method])
                body.set_edgecolor(colors[method])
                body.set_alpha(0.45)
            ax.plot(cfg.ks, [float(d.mean()) for d in data], "k.-", lw=0.8, ms=3)
            ax.axhline(1.0, color="grey", lw=0.5, ls=":")
            ax.set_ylim(max(lo, -1.0) - 0.05, 1.02)
            if i == 0:
                ax.set_title(f"λ = {lam:g}", fontsize=10)
            if j == 0:
                sol = "exact h*" if is_exact else f"h̃ (res<{cfg.inexact_tol:g})"
                ax.set_ylabel(f"{method.upper()}, {sol}\ncosine", fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel("k")
            ax.tick_params(labelsize=8)
    fig.suptitle(
        f"Cosine similarity between phantom and exact gradients (synthetic setting, "
        f"L_h = {cfg.lipschitz:g}, {cfg.draws} draws; line = mean)",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_error_figure(result: SyntheticResult, path: str | Path) -> Path:
    """Companion to Fig. 1 on a log scale: median of ``1 − cos`` (band: 10th–90th percentile)
    along k, one panel per λ, UPG and NPG from the exact and the inexact solution. Cosines near
    1 hide the differences that the logarithm of ``1 − cos`` shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    variants = [True] + ([False] if cfg.inexact_tol is not None else [])
    ncols = len(cfg.lams)
    fig, axes = plt.subplots(1, ncols, figsize=(2.6 * ncols + 1.0, 3.2), sharey=True, squeeze=False)
    colors = {"upg": "tab:blue", "npg": "tab:orange"}
    ks = np.asarray(cfg.ks)
    for j, lam in enumerate(cfg.lams):
        ax = axes[0][j]
        for method in cfg.methods:
            for is_exact in variants:
                errs = [
                    np.clip(1.0 - result.cosines[(method, k, lam, is_exact)], 1e-16, None)
                    for k in cfg.ks
                ]
                med = [float(np.median(e)) for e in errs]
                lo = [float(np.percentile(e, 10)) for e in errs]
                hi = [float(np.percentile(e, 90)) for e in errs]
                ls = "-" if is_exact else "--"
                label = f"{method.upper()}, " + (
                    "exact h*" if is_exact else f"h̃ (res<{cfg.inexact_tol:g})"
                )
                # UPG wide and translucent underneath, NPG thin on top: both stay visible
                # where they coincide (they do at an exact fixed point)
                wide = method == "upg"
                ax.plot(
                    ks,
                    med,
                    ls,
                    color=colors[method],
                    marker="o" if wide else ".",
                    ms=5 if wide else 3,
                    lw=3.0 if wide else 1.0,
                    alpha=0.5 if wide else 1.0,
                    label=label,
                    zorder=2 if wide else 3,
                )
                ax.fill_between(ks, lo, hi, color=colors[method], alpha=0.08, lw=0, zorder=1)
        ax.set_yscale("log")
        ax.set_title(f"λ = {lam:g}", fontsize=10)
        ax.set_xlabel("k")
        ax.tick_params(labelsize=8)
    axes[0][0].set_ylabel("1 − cosine (median, p10–p90)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    """``"1-10"``, ``"1,2,5"`` or a mix like ``"1-3,8"``; every k must be >= 1."""
    out: list[int] = []
    try:
        for part in text.split(","):
            rng = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
            if rng:
                lo, hi = int(rng.group(1)), int(rng.group(2))
                if hi < lo:
                    raise argparse.ArgumentTypeError(f"empty range {part!r} in {text!r}")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers >= 1 like '1-10' or '1,2,5', got {text!r}"
        ) from None
    bad = [k for k in out if k < 1]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"every k must be an integer >= 1, got {text!r}")
    return tuple(out)


def _lams(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers in (0, 1] like '0.5,1', got {text!r}"
        ) from None
    if not out or any(not math.isfinite(v) or not 0.0 < v <= 1.0 for v in out):
        raise argparse.ArgumentTypeError(f"every λ must be in (0, 1], got {text!r}")
    return out


def _methods(text: str) -> tuple[str, ...]:
    out = tuple(p.strip().lower() for p in text.split(","))
    bad = [m for m in out if m not in METHODS]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"allowed: {', '.join(METHODS)}; got {text!r}")
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _lipschitz(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1) so that F is a contraction, got {text!r}"
        )
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = SyntheticConfig()
    p = argparse.ArgumentParser(
        prog="phantomdeq synthetic",
        description=(
            "Paper Fig. 1: cosine similarity of the unrolled (UPG) and Neumann (NPG) phantom "
            "gradients to the exact gradient on F(h, x) = act(W h + U x + b) with Lipschitz "
            "constant L_h in h, plus the Theorem 1 descent-condition check."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--draws",
        type=_positive_int,
        default=d.draws,
        help="independent draws (problem, input, target)",
    )
    p.add_argument("--hidden", type=_positive_int, default=d.hidden, help="dimension of h")
    p.add_argument("--input-dim", type=_positive_int, default=d.input_dim, help="dimension of x")
    p.add_argument(
        "--lipschitz", type=_lipschitz, default=d.lipschitz, help="L_h of F in h, in (0, 1)"
    )
    p.add_argument("--activation", choices=tuple(ACTIVATIONS), default=d.activation)
    p.add_argument(
        "--ks", type=_ints, default=d.ks, help="unrolling/Neumann steps, e.g. 1-10 or 1,2,5"
    )
    p.add_argument(
        "--lams", type=_lams, default=d.lams, help="damping λ values in (0, 1], comma-separated"
    )
    p.add_argument(
        "--methods", type=_methods, default=d.methods, help="comma-separated subset of upg,npg"
    )
    p.add_argument(
        "--tol", type=_positive_float, default=d.tol, help="rel. residual defining the exact h*"
    )
    p.add_argument(
        "--max-iter", type=_positive_int, default=d.max_iter, help="fixed-point iterations at most"
    )
    p.add_argument(
        "--inexact-tol",
        type=_positive_float,
        default=d.inexact_tol,
        help="rel. residual at which the inexact h~ is stopped",
    )
    p.add_argument("--no-inexact", action="store_true", help="skip the inexact-solution variant")
    p.add_argument(
        "--broyden-iter",
        type=_positive_int,
        default=d.broyden_iter,
        help="Broyden iterations of the IFT check",
    )
    p.add_argument(
        "--no-theorem", action="store_true", help="skip the Theorem 1 explicit-matrix check"
    )
    p.add_argument("--seed", type=int, default=d.seed)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``phantomdeq synthetic``: returns 0 on success, 2 for invalid options."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse already printed the message naming the option
        return int(exc.code) if isinstance(exc.code, int) else 2
    cfg = SyntheticConfig(
        draws=args.draws,
        hidden=args.hidden,
        input_dim=args.input_dim,
        lipschitz=args.lipschitz,
        activation=args.activation,
        ks=args.ks,
        lams=args.lams,
        methods=args.methods,
        tol=args.tol,
        max_iter=args.max_iter,
        inexact_tol=None if args.no_inexact else args.inexact_tol,
        broyden_iter=args.broyden_iter,
        theorem=not args.no_theorem,
        seed=args.seed,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    result = run(cfg, progress=not args.no_progress)
    (out / "results.json").write_text(json.dumps(result.records, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(result.summary, indent=1) + "\n")
    written = [out / "results.json", out / "summary.json"]
    if not args.no_figure:
        fig: Path = args.fig if args.fig is not None else out / "fig1.png"
        written.append(write_figure(result, fig))
        written.append(write_error_figure(result, fig.with_name(f"{fig.stem}_error{fig.suffix}")))
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
