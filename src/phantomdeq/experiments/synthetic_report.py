"""Reports of the synthetic experiment (:mod:`.synthetic`): the terminal table and the
figures (paper Fig. 1 and its log-scale companion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from phantomdeq._plot import saved_figure

from .synthetic import SyntheticResult

__all__ = ["format_table", "write_error_figure", "write_figure"]

COLORS = {"upg": "tab:blue", "npg": "tab:orange"}


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
    cfg = result.config
    variants = [True] + ([False] if cfg.inexact_tol is not None else [])
    rows = [(m, v) for v in variants for m in cfg.methods]
    ncols = len(cfg.lams)
    size = (2.3 * ncols + 1.0, 2.1 * len(rows) + 0.6)
    with saved_figure(
        path, len(rows), ncols, figsize=size, sharex=True, sharey=True, squeeze=False
    ) as (fig, axes):
        _draw_violins(result, rows, axes)
        fig.suptitle(
            f"Cosine similarity between phantom and exact gradients (synthetic setting, "
            f"L_h = {cfg.lipschitz:g}, {cfg.draws} draws; line = mean)",
            fontsize=10,
        )
    return Path(path)


def _draw_violins(result: SyntheticResult, rows: list[tuple[str, bool]], axes: Any) -> None:
    cfg = result.config
    lo = min(float(c.min()) for c in result.cosines.values())
    for i, (method, is_exact) in enumerate(rows):
        for j, lam in enumerate(cfg.lams):
            ax = axes[i][j]
            data = [result.cosines[(method, k, lam, is_exact)] for k in cfg.ks]
            parts = ax.violinplot(
                data, positions=list(cfg.ks), widths=0.8, showextrema=False, showmedians=False
            )
            for body in parts["bodies"]:  # type: ignore[attr-defined]
                body.set_facecolor(COLORS[method])
                body.set_edgecolor(COLORS[method])
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


def write_error_figure(result: SyntheticResult, path: str | Path) -> Path:
    """Companion to Fig. 1 on a log scale: median of ``1 − cos`` (band: 10th–90th percentile)
    along k, one panel per λ, UPG and NPG from the exact and the inexact solution. Cosines near
    1 hide the differences that the logarithm of ``1 − cos`` shows."""
    cfg = result.config
    ncols = len(cfg.lams)
    size = (2.6 * ncols + 1.0, 3.2)
    with saved_figure(path, 1, ncols, figsize=size, sharey=True, squeeze=False) as (_, axes):
        _draw_errors(result, axes)
        axes[0][0].set_ylabel("1 − cosine (median, p10–p90)")
        axes[0][-1].legend(fontsize=7, loc="lower left")
    return Path(path)


def _draw_errors(result: SyntheticResult, axes: Any) -> None:
    cfg = result.config
    variants = [True] + ([False] if cfg.inexact_tol is not None else [])
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
                    color=COLORS[method],
                    marker="o" if wide else ".",
                    ms=5 if wide else 3,
                    lw=3.0 if wide else 1.0,
                    alpha=0.5 if wide else 1.0,
                    label=label,
                    zorder=2 if wide else 3,
                )
                ax.fill_between(ks, lo, hi, color=COLORS[method], alpha=0.08, lw=0, zorder=1)
        ax.set_yscale("log")
        ax.set_title(f"λ = {lam:g}", fontsize=10)
        ax.set_xlabel("k")
        ax.tick_params(labelsize=8)
