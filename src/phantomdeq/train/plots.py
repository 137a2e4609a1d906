"""Figures of a training run: ``curves.png`` (loss, accuracy, forward residual and the
gradient monitor's cosine against the step) and the monitor's Fig. 2-style plot, both from
``metrics.jsonl``. matplotlib is optional: without it nothing is drawn (None is returned)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from phantomdeq._plot import saved_figure

from .metrics_log import read_metrics

__all__ = ["plot_curves", "plot_monitor"]


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Draw loss, accuracy and forward residual against the step into ``out_path`` (PNG), plus
    the gradient-quality monitor's cosine (``monitor_cos``) when the run recorded it.

    Returns None (and draws nothing) when matplotlib is missing or there are no records.
    """
    rows = read_metrics(metrics_path)
    steps = [r for r in rows if r.get("kind") == "step"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    if not steps and not epochs:
        return None

    monitor = _series(steps, "monitor_cos")
    size = (18.5 if monitor[0] else 14, 3.8)
    try:
        with saved_figure(out_path, 1, 4 if monitor[0] else 3, figsize=size) as (_, axes):
            _draw_curves(axes, steps, epochs, monitor)
    except ImportError:  # matplotlib is optional (the `plots` extra)
        return None
    return Path(out_path)


def _series(rs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rs:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            xs.append(float(r["step"]))
            ys.append(float(v))
    return xs, ys


def _draw_curves(
    axes: Any,
    steps: list[dict[str, Any]],
    epochs: list[dict[str, Any]],
    monitor: tuple[list[float], list[float]],
) -> None:
    series = _series
    ax = axes[0]
    ax.plot(*series(steps, "train_loss"), lw=0.8, label="train (step)")
    ax.plot(*series(epochs, "test_loss"), "o-", label="test (epoch)")
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[1]
    ax.plot(*series(steps, "train_acc"), lw=0.8, alpha=0.6, label="train (step)")
    ax.plot(*series(epochs, "test_acc"), "o-", label="test (epoch)")
    ax.set_title("accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(0.0, 1.0)
    ax.legend()
    ax = axes[2]
    xs, ys = series(steps, "fwd_residual")
    if xs:
        ax.semilogy(xs, [max(y, 1e-12) for y in ys], lw=0.8, label="train forward")
    xs, ys = series(epochs, "test_fwd_residual")
    if xs:
        ax.semilogy(xs, [max(y, 1e-12) for y in ys], "o-", label="test forward")
    ax.set_title("relative residual ||F(h)-h||/||h||")
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if monitor[0]:
        # the gradient-quality monitor (paper Fig. 2): cosine of the used vs the exact gradient
        ax = axes[3]
        ax.plot(*monitor, "o-", ms=3, label="cos(used, exact)")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_ylim(min(-0.05, min(monitor[1]) - 0.05), 1.02)
        ax.set_title("gradient cosine vs exact (monitor)")
        ax.set_xlabel("step")
        ax.legend(loc="lower right")


def plot_monitor(
    metrics_path: Any, out_path: Any, *, title: str | None = None, unconverged: float = 1e-3
) -> Any:
    """Draw the monitor's records of ``metrics.jsonl`` (``monitor_cos``, ``monitor_norm_ratio``
    against the training step) into ``out_path`` -- the paper's Fig. 2 for one training run.
    Measurements whose exact backward solve ended above ``unconverged`` (residual in the
    monitor solver's stop mode) are marked: there the "exact" gradient is not exact. The
    ``train.monitor_compare`` estimators (``monitor_cos_<label>``, e.g. UPG and NPG along an
    IFT-trained run, as in the paper's Fig. 2) are drawn beside the gradient in use.

    Returns the path, or None when matplotlib is missing or there are no monitor records.
    """
    rows = [
        r
        for r in read_metrics(metrics_path)
        if r.get("kind") == "step" and isinstance(r.get("monitor_cos"), int | float)
    ]
    if not rows:
        return None
    steps = [float(r["step"]) for r in rows]
    cos = [float(r["monitor_cos"]) for r in rows]
    ratio = [
        float(r["monitor_norm_ratio"])
        if isinstance(r.get("monitor_norm_ratio"), int | float)
        else math.nan
        for r in rows
    ]
    res = [
        float(r["monitor_exact_residual"])
        if isinstance(r.get("monitor_exact_residual"), int | float)
        else math.nan
        for r in rows
    ]
    bad = [i for i, v in enumerate(res) if v > unconverged]
    # train.monitor_compare estimators: monitor_cos_<label> / monitor_norm_ratio_<label>
    labels = sorted(
        {k[len("monitor_cos_") :] for r in rows for k in r if k.startswith("monitor_cos_")}
    )
    compared = {
        label: (
            [_num(r.get(f"monitor_cos_{label}")) for r in rows],
            [_num(r.get(f"monitor_norm_ratio_{label}")) for r in rows],
        )
        for label in labels
    }
    try:
        with saved_figure(out_path, 1, 2, figsize=(10, 3.8)) as (_, (ax, ax2)):
            _draw_monitor(ax, ax2, steps, cos, ratio, bad, unconverged, title, compared)
    except ImportError:  # matplotlib is optional (the `plots` extra)
        return None
    return Path(out_path)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def _draw_monitor(
    ax: Any,
    ax2: Any,
    steps: list[float],
    cos: list[float],
    ratio: list[float],
    bad: list[int],
    unconverged: float,
    title: str | None,
    compared: dict[str, tuple[list[float], list[float]]] | None = None,
) -> None:
    compared = compared or {}
    ax.plot(steps, cos, "o-", ms=3, label="cos(g_used, g_exact)")
    for i, (label, (c, r)) in enumerate(compared.items()):
        ax.plot(steps, c, "s-", ms=3, color=f"C{i + 2}", label=f"cos({label}, g_exact)")
        ax2.semilogy(steps, r, "s-", ms=3, color=f"C{i + 2}", label=label)
    if compared:
        cos = cos + [v for c, _ in compared.values() for v in c if math.isfinite(v)]
    if bad:
        ax.plot(
            [steps[i] for i in bad],
            [cos[i] for i in bad],
            "rx",
            ms=8,
            label=f"exact backward solve not converged (residual > {unconverged:g})",
        )
    if bad or compared:
        ax.legend(loc="lower right", fontsize=7)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("cos(g_used, g_exact)")
    ax.set_ylim(min(-0.05, min(cos) - 0.05), 1.02)
    ax.set_title(title or "cosine vs the exact (IFT) gradient", fontsize=10)
    ax.grid(alpha=0.3)
    ax2.semilogy(steps, ratio, "o-", ms=3, color="C1", label="g_used")
    if compared:
        ax2.legend(fontsize=7)
    ax2.axhline(1.0, color="k", lw=0.6)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("||g_used|| / ||g_exact||")
    ax2.set_title("norm ratio")
    ax2.grid(alpha=0.3)
