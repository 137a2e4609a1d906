"""Reports of an ablation study (:mod:`.ablation`): per-configuration aggregates over seeds,
the Table-1-style ``table.md``, ``ablation.json`` and the Fig. 3 plot ``fig3.png``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from phantomdeq import grad as pdq_grad
from phantomdeq._plot import saved_figure

__all__ = [
    "is_k_grid",
    "paired_difference",
    "paired_table",
    "plot_fig3",
    "summarize",
    "table_markdown",
    "write_reports",
]


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


def _fmt(x: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x * scale, spec)


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


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
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


def write_reports(out: Path, argv: list[str], *, prog: str = "phantomdeq ablate") -> dict[str, Any]:
    """Write ``ablation.json``, ``table.md`` and ``fig3.png`` from every finished run."""
    summary = summarize(out)
    table = table_markdown(summary["rows"])
    (out / "table.md").write_text(table)
    doc = {
        "command": f"{prog} " + " ".join(argv),
        "rows": summary["rows"],
        "paired": paired_table(summary["rows"]),
        "runs": summary["runs"],
    }
    tmp = out / "ablation.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, out / "ablation.json")
    fig = out / "fig3.png"
    if plot_fig3(summary["rows"], fig) is None and fig.exists():
        fig.unlink()  # a figure from an earlier k grid no longer describes the study
    print(table, end="")
    return doc
