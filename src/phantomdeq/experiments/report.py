"""The reports of the experiments: the terminal tables, the figures and the study files.

* synthetic setting (paper Fig. 1, :mod:`.synthetic`): :func:`synthetic_table`,
  :func:`synthetic_figure` (``fig1.png``) and its log-scale companion
  :func:`synthetic_error_figure`;
* ablation studies (paper Table 1 and Fig. 3, :mod:`.ablation`): per-configuration aggregates
  over seeds (:func:`summarize`, :func:`paired_table`), the Table-1-style ``table.md``
  (:func:`table_markdown`), ``ablation.json`` and the Fig. 3 plot ``fig3.png``
  (:func:`plot_fig3`), all written by :func:`write_reports`;
* cost of each gradient (paper Table 2, :mod:`.cost`): :func:`cost_table` and ``cost.png``
  (:func:`cost_plot`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from phantomdeq import grad as pdq_grad
from phantomdeq._plot import saved_figure

from .command import Outputs


class SyntheticResult(Protocol):
    """What the Fig. 1 report reads of :class:`.synthetic.SyntheticResult` (a protocol, so
    that this module does not import the experiment that imports it)."""

    config: Any
    records: list[dict[str, Any]]
    cosines: dict[tuple[str, int, float, bool], np.ndarray]
    summary: dict[str, Any]


__all__ = [
    "cost_plot",
    "cost_table",
    "is_k_grid",
    "paired_difference",
    "paired_table",
    "plot_fig3",
    "summarize",
    "synthetic_error_figure",
    "synthetic_figure",
    "synthetic_table",
    "table_markdown",
    "write_reports",
]


def _fmt(x: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x * scale, spec)


# --------------------------------------------------------------------------- synthetic (Fig. 1)

COLORS = {"upg": "tab:blue", "npg": "tab:orange"}


def synthetic_table(result: SyntheticResult) -> str:
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


def synthetic_figure(result: SyntheticResult, path: str | Path) -> Path:
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


def synthetic_error_figure(result: SyntheticResult, path: str | Path) -> Path:
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


# --------------------------------------------------------------------------- ablation (Table 1, Fig. 3)


def _method_name(grad: str) -> str:
    cls = pdq_grad.ESTIMATORS.get(grad)
    return grad if cls is None else cls.__name__


def _has_k(grad: str) -> bool:
    return grad in pdq_grad.ESTIMATORS and "k" in pdq_grad.options(grad)


def _method(cfg: dict[str, Any]) -> str:
    g = cfg["grad"]
    name = _method_name(g["name"])
    if _has_k(g["name"]):
        return f"{name} A_{{{g['k']},{g['lam']:g}}}"
    return name


def _row_of(cfg: dict[str, Any]) -> dict[str, Any]:
    m = cfg["model"]
    dropout = m.get("dropout")
    if dropout is None:
        from phantomdeq.models.mdeq import mdeq_config

        try:
            dropout = mdeq_config(m["name"]).dropout
        except ValueError:
            dropout = None
    return {
        "method": _method(cfg),
        "grad": cfg["grad"]["name"],
        # an adaptive k ("auto") is no point on the k axis: its rows are listed, not plotted
        "k": cfg["grad"]["k"]
        if _has_k(cfg["grad"]["name"]) and isinstance(cfg["grad"]["k"], int)
        else None,
        "lam": cfg["grad"]["lam"] if _has_k(cfg["grad"]["name"]) else None,
        "pretrain_steps": cfg["train"]["pretrain_steps"],
        "dropout": dropout,
        "optimizer": cfg["optim"]["name"],
        "fwd_max_iter": cfg["solver"]["max_iter"],
    }


def _collect(out: Path) -> list[dict[str, Any]]:
    """Every finished run under ``out/runs`` with its config and result."""
    import yaml

    runs = []
    for res_path in sorted((out / "runs").glob("*/result.json")):
        run_dir = res_path.parent
        meta_path = run_dir / "ablation_run.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        result = json.loads(res_path.read_text())
        cfg = meta.get("config")
        if cfg is None and (run_dir / "config.yaml").is_file():
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        runs.append({**meta, "config": cfg, "result": result, "dir": run_dir.name})
    return runs


def summarize(out: Path) -> dict[str, Any]:
    """Aggregate the finished runs under ``out`` into rows (one per configuration)."""
    import statistics

    runs = _collect(out)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["key"], []).append(r)
    rows = []
    for key, rs in groups.items():
        rs.sort(key=lambda r: r["seed"])
        ok = [
            r
            for r in rs
            if r["result"].get("status") == "ok" and r["result"].get("test_acc") is not None
        ]
        accs = [float(r["result"]["test_acc"]) for r in ok]
        bests = [float(r["result"].get("best_test_acc") or r["result"]["test_acc"]) for r in ok]
        times = [
            r["result"]["epoch_time_s"] for r in ok if r["result"].get("epoch_time_s") is not None
        ]
        nsteps = [
            r["result"]["train_fwd_nstep"]
            for r in ok
            if r["result"].get("train_fwd_nstep") is not None
        ]
        conv = [
            float(r["result"]["test_fwd_converged"])
            for r in ok
            if r["result"].get("test_fwd_converged") is not None
        ]
        medians = [
            r["result"]["grad_norm_median"]
            for r in ok
            if r["result"].get("grad_norm_median") is not None
        ]
        maxima = [
            r["result"]["grad_norm_max"] for r in rs if r["result"].get("grad_norm_max") is not None
        ]
        row = {
            "key": key,
            "label": rs[0]["label"],
            "source": rs[0]["source"],
            **_row_of(rs[0]["config"]),
            "seeds": [r["seed"] for r in rs],
            "n_runs": len(rs),
            "n_failed": len(rs) - len(ok),
            "acc": accs,
            "acc_by_seed": {r["seed"]: float(r["result"]["test_acc"]) for r in ok},
            "acc_mean": statistics.fmean(accs) if accs else None,
            # the spread over seeds is undefined for one run: None, printed "n/a"
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "acc_best": max(accs) if accs else None,
            "best_epoch_acc_mean": statistics.fmean(bests) if bests else None,
            "epoch_time_s": statistics.fmean(times) if times else None,
            "train_fwd_nstep": statistics.fmean(nsteps) if nsteps else None,
            # share of test samples whose evaluation solve reached tol, mean over seeds
            "test_converged_mean": statistics.fmean(conv) if conv else None,
            # global gradient norm before clipping over the DEQ steps: median (mean over the
            # finished seeds) and the largest of any run, diverged runs included
            "grad_norm_median": statistics.fmean(medians) if medians else None,
            "grad_norm_max": max(maxima) if maxima else None,
            "failures": [r["result"].get("message", "") for r in rs if r not in ok],
        }
        rows.append(row)
    rows.sort(key=lambda r: (r["source"], r["grad"], r["lam"] or 0.0, r["k"] or 0, r["label"]))
    return {"runs": runs, "rows": rows}


def paired_difference(a: dict[Any, float], b: dict[Any, float]) -> dict[str, Any] | None:
    """Paired comparison of two configurations over the seeds both finished (same seed = same
    data subset and initialisation): ``mean`` of ``a[s] - b[s]``, its standard error
    ``se = stdev / sqrt(n)`` (None for one seed), ``n`` and ``wins`` (seeds where a > b).
    None when no seed is shared."""
    import statistics

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    return {
        "seeds": seeds,
        "n": n,
        "mean": statistics.fmean(d),
        "se": statistics.stdev(d) / math.sqrt(n) if n > 1 else None,
        "wins": sum(x > 0 for x in d),
        "ties": sum(x == 0 for x in d),
    }


def paired_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`paired_difference` of every ordered pair of rows (accuracies by seed)."""
    out = []
    for a in rows:
        for b in rows:
            if a is b:
                continue
            res = paired_difference(a["acc_by_seed"], b["acc_by_seed"])
            if res is not None:
                out.append({"a": a["label"], "b": b["label"], **res})
    return out


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The Table-1-style table: accuracy as mean (best) over seeds, in percent, beside the share
    of test samples whose evaluation solve converged (mean over seeds) and the gradient norms
    (median over steps, mean over seeds / largest of any run; '-' for runs that did not log
    them)."""
    head = (
        "| Configuration | Method | Pretrain steps | Dropout | Optimizer | Forward steps (max / mean) "
        "| Time/epoch (s) | Test converged % | Acc % mean (best) | ± std | Runs (failed) "
        "| Grad norm median / max |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        acc = (
            f"{_fmt(r['acc_mean'], '.2f', 100)} ({_fmt(r['acc_best'], '.2f', 100)})"
            if r["acc_mean"] is not None
            else "diverged"
        )
        fwd = f"{r['fwd_max_iter']} / {_fmt(r['train_fwd_nstep'], '.1f')}"
        std = "n/a" if len(r["acc"]) < 2 else _fmt(r["acc_std"], ".2f", 100)
        lines.append(
            f"| {r['label']} | {r['method']} | {r['pretrain_steps']} | {_fmt(r['dropout'], 'g')} "
            f"| {r['optimizer']} | {fwd} | {_fmt(r['epoch_time_s'], '.1f')} "
            f"| {_fmt(r.get('test_converged_mean'), '.1f', 100)} | {acc} "
            f"| {std} | {r['n_runs']} ({r['n_failed']}) "
            f"| {_fmt(r.get('grad_norm_median'), '.3g')} / {_fmt(r.get('grad_norm_max'), '.3g')} |"
        )
    return "\n".join(lines) + "\n"


def is_k_grid(rows: list[dict[str, Any]]) -> bool:
    """Whether the study varies ``k`` (some phantom-gradient curve has two or more k values):
    only then is there an "accuracy vs k and λ" figure to draw."""
    ks: dict[tuple[Any, Any, Any], set[int]] = {}
    for r in rows:
        if r["k"] is not None:
            ks.setdefault((r["grad"], r["lam"], r["source"]), set()).add(r["k"])
    return any(len(v) > 1 for v in ks.values())


def plot_fig3(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Test accuracy vs k (mean ± std over seeds; × marks the best seed), one curve per
    (method, λ, preset); estimators without k (IFT, ...) as horizontal lines. The k axis
    carries exactly the k values that were run. Only for a study that varies k
    (:func:`is_k_grid`): otherwise nothing is drawn and None is returned."""
    if not is_k_grid(rows):
        return None
    curves: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    flat: list[dict[str, Any]] = []
    for r in rows:
        if r["acc_mean"] is None and r["k"] is None:
            continue
        if r["k"] is None:
            flat.append(r)
        else:
            curves.setdefault((r["grad"], r["lam"], r["source"]), []).append(r)
    if not curves and not flat:
        return None
    norms = any(r.get("grad_norm_max") is not None for rs in curves.values() for r in rs)
    try:
        if norms:
            with saved_figure(path, 1, 2, figsize=(13, 4.5)) as (_, axes):
                _draw_fig3(axes[0], curves, flat)
                _draw_grad_norms(axes[1], curves)
        else:
            with saved_figure(path, figsize=(7, 4.5)) as (_, ax):
                _draw_fig3(ax, curves, flat)
    except ImportError:  # matplotlib is optional (the `plots` extra)
        return None
    return path


def _k_axis(ax: Any, curves: dict[tuple[str, float, str], list[dict[str, Any]]]) -> None:
    """The k axis of both Fig. 3 panels: exactly the k values that were run."""
    ks_run = sorted({r["k"] for rs in curves.values() for r in rs})
    ax.set_xticks(ks_run)
    ax.set_xticklabels([str(k) for k in ks_run])
    ax.set_xlabel("k (unrolled / Neumann steps)")


def _draw_grad_norms(ax: Any, curves: dict[tuple[str, float, str], list[dict[str, Any]]]) -> None:
    """The second panel of Fig. 3 (when the runs logged ``grad_norm``): the largest global
    gradient norm before clipping of any seed (filled) and the median over steps, mean over
    seeds (open), against k -- where an estimator's instability shows before it diverges."""
    sources = {key[2] for key in curves}
    for i, ((grad, lam, source), rs) in enumerate(sorted(curves.items())):
        rs = sorted(rs, key=lambda r: r["k"])
        label = f"{_method_name(grad)} λ={lam:g}"
        if len(sources) > 1:
            label += f" ({Path(source).stem})"
        pts = [(r["k"], r["grad_norm_max"]) for r in rs if r.get("grad_norm_max") is not None]
        if not pts:
            continue
        (line,) = ax.plot(*zip(*pts), marker="os^"[i % 3], color=f"C{i}", label=label)
        med = [(r["k"], r["grad_norm_median"]) for r in rs if r.get("grad_norm_median") is not None]
        if med:
            ax.plot(*zip(*med), marker="o", ls=":", mfc="none", color=line.get_color())
    _k_axis(ax, curves)
    ax.set_yscale("log")
    ax.set_ylabel("gradient norm before clipping")
    ax.set_title("Largest (solid) and median (dotted) gradient norm")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _draw_fig3(
    ax: Any, curves: dict[tuple[str, float, str], list[dict[str, Any]]], flat: list[dict[str, Any]]
) -> None:
    sources = {key[2] for key in curves}
    markers = {"upg": "o", "npg": "s"}
    ordered = sorted(curves)
    for (grad, lam, source), rs in sorted(
        curves.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])
    ):
        rs = sorted(rs, key=lambda r: r["k"])
        # a small horizontal offset per curve keeps error bars at the same k apart
        dx = 0.06 * (ordered.index((grad, lam, source)) - (len(ordered) - 1) / 2)
        ks = [r["k"] + dx for r in rs if r["acc_mean"] is not None]
        ys = [100 * r["acc_mean"] for r in rs if r["acc_mean"] is not None]
        es = [100 * (r["acc_std"] or 0.0) for r in rs if r["acc_mean"] is not None]
        label = f"{_method_name(grad)} λ={lam:g}"
        if len(sources) > 1:
            label += f" ({Path(source).stem})"
        line = ax.errorbar(ks, ys, yerr=es, marker=markers.get(grad, "^"), capsize=3, label=label)
        bk = [r["k"] + dx for r in rs if r["acc_best"] is not None]
        bb = [100 * r["acc_best"] for r in rs if r["acc_best"] is not None]
        ax.plot(bk, bb, "x", color=line[0].get_color(), alpha=0.7)
        for r in rs:
            if r["n_failed"]:
                ax.text(
                    r["k"],
                    0.03,
                    f"{r['n_failed']}/{r['n_runs']} diverged",
                    transform=ax.get_xaxis_transform(),
                    fontsize=7,
                    rotation=90,
                    color=line[0].get_color(),
                    clip_on=True,
                )
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, r in enumerate(flat):
        if r["acc_mean"] is None:
            continue
        ax.axhline(
            100 * r["acc_mean"],
            ls=styles[i % len(styles)],
            color="k" if i == 0 else f"C{(i + 5) % 10}",
            lw=1.2,
            label=f"{r['label']} ({r['method']})",
        )
    _k_axis(ax, curves)
    ax.set_ylabel("test accuracy % (mean ± std over seeds; × best)")
    ax.set_title("Accuracy vs k and λ (paper Fig. 3)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_reports(
    outputs: Outputs, argv: list[str], *, prog: str = "phantomdeq ablate"
) -> dict[str, Any]:
    """Write ``ablation.json``, ``table.md`` and ``fig3.png`` into ``outputs.out`` from every
    finished run under it, and print the table."""
    out = outputs.out
    summary = summarize(out)
    table = table_markdown(summary["rows"])
    outputs.text("table.md", table)
    doc = {
        "command": f"{prog} " + " ".join(argv),
        "rows": summary["rows"],
        "paired": paired_table(summary["rows"]),
        "runs": summary["runs"],
    }
    outputs.json("ablation.json", doc)
    fig = out / "fig3.png"
    if plot_fig3(summary["rows"], fig) is not None:
        outputs.add(fig)
    elif fig.exists():
        fig.unlink()  # a figure from an earlier k grid no longer describes the study
    print(table, end="")
    return doc


# --------------------------------------------------------------------------- cost (Table 2)


def cost_table(records: Sequence[dict[str, Any]]) -> str:
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


def cost_plot(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``cost.png``: step time and peak memory vs k for UPG, UPG-ckpt and NPG, with IFT,
    OneStep and BPTT as horizontal reference lines."""
    modes = [r.get("mode", "eager") for r in records]
    first = modes[0] if modes else "eager"
    records = [r for r, m in zip(records, modes) if m == first]  # one curve set: the first mode
    with saved_figure(path, 1, 2, figsize=(11, 4.2)) as (fig, axes):
        _draw_cost(records, fig, axes)
    return Path(path)


def _draw_cost(records: Sequence[dict[str, Any]], fig: Any, axes: Any) -> None:
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
