"""What a training run writes for people: ``metrics.jsonl``, TensorBoard logs and ``curves.png``.

``metrics.jsonl`` has one JSON object per line, each with ``"kind": "step"`` (one training
iteration; ``batch`` is its 1-based index in the epoch, ``skipped: true`` marks a step dropped
by ``train.on_nonfinite: skip``; ``grad_norm`` is the global gradient norm before clipping;
``grad_k`` is the number of steps an adaptive phantom gradient, ``grad.k: auto``, chose) or ``"kind": "epoch"`` (end of an epoch, with the evaluation).
A process killed while appending can leave a torn last line: readers ignore an unparsable *last*
line, and a resumed run rewrites the file (atomically) without it. TensorBoard and
matplotlib are optional and imported lazily; when either is missing (or TensorBoard cannot be
imported cleanly) the run says so once at its start (:func:`missing_output_notes`) and goes on
without that output.

Figures of a training run: ``curves.png`` (loss, accuracy, forward residual and the
gradient monitor's cosine against the step) and the monitor's Fig. 2-style plot, both from
``metrics.jsonl``. matplotlib is optional: without it nothing is drawn (None is returned).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from phantomdeq._extras import is_available, missing_message
from phantomdeq._plot import saved_figure
from phantomdeq._progress import NullBar
from phantomdeq._progress import progress_bar as make_bar

from .run_folder import atomic_write, output_write_error

__all__ = [
    "show_step",
    "progress_bar",
    "mean_forward_steps",
    "fresh_sums",
    "epoch_summary",
    "epoch_line",
    "draw_run_curves",
    "add_to_sums",
    "MetricsFileError",
    "MetricsLogger",
    "history_gap",
    "missing_output_notes",
    "plot_curves",
    "plot_monitor",
    "read_metrics",
    "recorded_epochs",
    "truncate_metrics",
]


# --- metrics.jsonl and TensorBoard ------------------------------------------------------------


class MetricsFileError(RuntimeError):
    """``metrics.jsonl`` has an unreadable line before its last one (not a torn append)."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class MetricsLogger:
    """Append records to ``out_dir/metrics.jsonl`` and mirror scalars to TensorBoard.

    Only the main process (rank 0) should construct an enabled logger; ``enabled=False`` makes
    every method a no-op. ``append=False`` starts a new ``metrics.jsonl`` (a fresh run).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        append: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._fh = None
        self._tb: Any = None
        if not enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a" if append else "w", encoding="utf-8")
        except OSError as exc:
            raise output_write_error(self.path, exc, "open") from exc
        if tensorboard:
            self._tb = _make_writer(Path(out_dir) / "tensorboard")

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def log(self, kind: str, record: dict[str, Any]) -> None:
        if not self.enabled or self._fh is None:
            return
        row = {"kind": kind, **{k: _clean(v) for k, v in record.items()}}
        try:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()
        except OSError as exc:
            # at most a torn last line is left, which readers skip
            fh, self._fh = self._fh, None
            with contextlib.suppress(OSError):
                fh.close()  # closes the file even when flushing the buffer fails again
            raise output_write_error(
                self.path, exc, "append to", "the records before are kept"
            ) from exc
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key in ("step", "epoch", "kind") or isinstance(value, bool):
                    continue
                if isinstance(value, int | float) and math.isfinite(float(value)):
                    self._tb.add_scalar(f"{kind}/{key}", float(value), step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._tb.close()
            self._tb = None


def _make_writer(log_dir: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter``, or None when TensorBoard is unavailable."""
    try:
        with warnings.catch_warnings():
            # TensorBoard and its protobuf/pkg_resources dependencies may emit deprecation
            # warnings on import; they must not break runs under ``-W error``.
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(log_dir))
    except Exception:
        return None


def missing_output_notes(*, tensorboard: bool, tensorboard_works: bool, plot: bool) -> list[str]:
    """One line per output the config asks for (``log.tensorboard``, ``log.plot``) that this
    installation cannot write, naming the extra that brings it and the key that turns it off."""
    notes = []
    if tensorboard and not tensorboard_works:
        if is_available("tensorboard"):
            why = "TensorBoard is installed but cannot be imported cleanly"
        else:
            why = missing_message(["tensorboard"], "it")
        notes.append(f"phantomdeq: no tensorboard/ logs: {why} (or set log.tensorboard: false)")
    if plot and not is_available("matplotlib"):
        why = missing_message(["matplotlib"], "it")
        notes.append(f"phantomdeq: no curves.png: {why} (or set log.plot: false)")
    return notes


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse a ``metrics.jsonl`` file. An unparsable last line (an append torn by a kill) is
    ignored; an unparsable earlier line raises :class:`MetricsFileError` naming the file and
    line."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # torn by a kill while appending
            raise MetricsFileError(
                f"{str(path)!r} line {number} is not a JSON record ({exc.msg}); "
                f"repair or delete the line"
            ) from exc
        if not isinstance(row, dict):
            raise MetricsFileError(f"{str(path)!r} line {number} is not a JSON object")
        rows.append(row)
    return rows


def _position_of(row: dict[str, Any]) -> tuple[int, int] | None:
    """(completed epochs, batches of the next epoch) right after a record, when it says."""
    epoch, batch = row.get("epoch"), row.get("batch")
    if row.get("kind") == "epoch" and isinstance(epoch, int):
        return epoch, 0
    if row.get("kind") == "step" and isinstance(epoch, int) and isinstance(batch, int):
        return epoch - 1, batch
    return None


def recorded_epochs(path: Path) -> int:
    """The finished epochs ``metrics.jsonl`` records (its highest ``epoch`` record; 0 when the
    file is missing)."""
    if not path.is_file():
        return 0
    done = [r.get("epoch") for r in read_metrics(path) if r.get("kind") == "epoch"]
    return max((e for e in done if isinstance(e, int)), default=0)


def history_gap(kept: list[dict[str, Any]] | None, epoch: int, step: int) -> str:
    """Why the records ``kept`` (None: no ``metrics.jsonl``) cannot be the history of a run
    resumed after ``epoch`` finished epochs and ``step`` steps, or ``""`` when they can."""
    if epoch == 0 and step == 0:
        return ""
    if kept is None:
        return "is missing"
    if not kept:
        return "is empty"
    done = max(
        (r["epoch"] for r in kept if r.get("kind") == "epoch" and isinstance(r.get("epoch"), int)),
        default=0,
    )
    if done < epoch:
        return f"records {done} of the {epoch} finished epochs"
    return ""


def truncate_metrics(
    path: Path, epoch: int, step: int, batch: int = 0
) -> list[dict[str, Any]] | None:
    """Drop the records written after the checkpoint being resumed from (``epoch`` completed
    epochs, then ``batch`` batches of the next one, ``step`` optimiser steps) and a torn last
    line; the file is replaced atomically. Returns the records kept (None: no file)."""
    if not path.is_file():
        return None
    keep = []
    for r in read_metrics(path):
        pos = _position_of(r)
        if pos is not None:
            if pos <= (epoch, batch):
                keep.append(r)
        elif int(r.get("step", 0)) <= step and int(r.get("epoch", 0)) <= epoch:
            keep.append(r)  # records of older versions (no batch field)
    with atomic_write(path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in keep))
    return keep


# --- figures ----------------------------------------------------------------------------------


def plot_curves(
    metrics_path: str | Path,
    out_path: str | Path,
    metrics: tuple[str, ...] = ("loss", "acc"),
) -> Path | None:
    """Draw the task's ``metrics`` (train per step, test per evaluation; ``loss`` first, e.g.
    ``("loss", "acc")`` of a classifier, ``("loss", "bpc", "acc")`` of a language model) and
    the forward residual against the step into ``out_path`` (PNG), plus the gradient-quality
    monitor's cosine (``monitor_cos``) when the run recorded it.

    Returns None (and draws nothing) when matplotlib is missing or there are no records.
    """
    rows = read_metrics(metrics_path)
    steps = [r for r in rows if r.get("kind") == "step"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    if not steps and not epochs:
        return None

    monitor = _series(steps, "monitor_cos")
    names = ("loss", *[m for m in metrics if m != "loss"])
    panels = len(names) + 1 + (1 if monitor[0] else 0)
    size = (4.6 * panels, 3.8)
    try:
        with saved_figure(out_path, 1, panels, figsize=size) as (_, axes):
            _draw_curves(axes, steps, epochs, monitor, names)
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
    names: tuple[str, ...] = ("loss", "acc"),
) -> None:
    series = _series
    titles = {"acc": "accuracy", "bpc": "bits per character"}
    for ax, name in zip(axes, names):
        ax.plot(*series(steps, f"train_{name}"), lw=0.8, alpha=0.7, label="train (step)")
        ax.plot(*series(epochs, f"test_{name}"), "o-", label="test (epoch)")
        ax.set_title(titles.get(name, name))
        ax.set_xlabel("step")
        if name == "acc":
            ax.set_ylim(0.0, 1.0)
        ax.legend()
    ax = axes[len(names)]
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
        ax = axes[len(names) + 1]
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


# --- what a run reports on stderr and returns ------------------------------------------------


def fresh_sums() -> dict[str, float]:
    """Accumulators of one epoch's training statistics (checkpointed mid-epoch)."""
    keys = ("loss", "acc", "n", "nstep", "res", "conv", "deq_n", "monitor_time", "skipped")
    return dict.fromkeys((*keys, "scaler_skipped"), 0.0)


def add_to_sums(sums: dict[str, float], rec: dict[str, Any], metric_names: tuple[str, ...]) -> None:
    """Count one step's record into the epoch statistics ``sums``."""
    if rec.get("skipped", False):
        sums["skipped"] += 1
        return
    n = rec["n"]
    for m in metric_names:
        sums[m] = sums.get(m, 0.0) + rec[f"train_{m}"] * n
    sums["n"] += n
    sums["scaler_skipped"] += float(rec.get("scaler_skipped", 0))
    if rec["stage"] == "deq" and math.isfinite(rec["fwd_nstep"]):
        sums["nstep"] += rec["fwd_nstep"] * n
        sums["res"] += rec["fwd_residual"] * n
        sums["conv"] += rec["fwd_converged"] * n
        sums["deq_n"] += n


def epoch_summary(
    sums: dict[str, float],
    metric_names: tuple[str, ...],
    seconds: float,
    *,
    monitor: bool,
    scaling: bool,
    skipping: bool,
) -> dict[str, Any]:
    """The epoch's training statistics from its ``sums`` (``seconds``: the epoch's wall time,
    the gradient monitor's included; ``monitor``, ``scaling``, ``skipping``: whether the run
    measures the gradient, scales fp16 losses, skips non-finite steps)."""
    n = max(sums["n"], 1.0)
    deq_n = sums["deq_n"]
    first, *rest = metric_names  # the loss is NaN when no step counted
    out = {
        f"train_{first}": sums.get(first, 0.0) / n if sums["n"] else math.nan,
        **{f"train_{m}": sums.get(m, 0.0) / n for m in rest},
        "fwd_nstep": sums["nstep"] / deq_n if deq_n else math.nan,
        "fwd_residual": sums["res"] / deq_n if deq_n else math.nan,
        "fwd_converged": sums["conv"] / deq_n if deq_n else math.nan,
        "epoch_time_s": seconds - sums["monitor_time"],
        **({"monitor_time_s": sums["monitor_time"]} if monitor else {}),
        **({"scaler_skipped_steps": sums["scaler_skipped"]} if scaling else {}),
    }
    if skipping:
        out["skipped_steps"] = int(sums["skipped"])
    return out


def progress_bar(epoch: int, epochs: int, total: int, start: int) -> Any:
    """A tqdm bar on stderr for the batches of ``epoch`` (None when tqdm is not installed)."""
    bar = make_bar(
        enabled=True,
        auto=True,
        total=total,
        initial=start,
        desc=f"epoch {epoch + 1}/{epochs}",
        leave=False,
        dynamic_ncols=True,
    )
    return None if isinstance(bar, NullBar) else bar


def show_step(bar: Any, rec: dict[str, Any], metric_names: tuple[str, ...], skipped: int) -> None:
    """One step on the progress bar ``bar`` (nothing when None)."""
    if bar is None:
        return
    bar.update(1)
    deq = rec["stage"] == "deq"
    post = {m: f"{rec[f'train_{m}']:.3f}" for m in metric_names}
    post |= {
        "nstep": f"{rec['fwd_nstep']:.1f}" if deq else "unrolled",
        "res": f"{rec['fwd_residual']:.1e}" if deq else "-",
    }
    if skipped:
        post["skipped"] = str(skipped)
    bar.set_postfix(post, refresh=False)


def epoch_line(rec: dict[str, Any], epochs: int, described: list[str], seconds: float) -> str:
    """The one-line summary of an epoch's record ``rec`` on stderr (``described``: the task's
    words for its evaluation metrics)."""
    parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec['train_loss']:.4f}"]
    if "test_n" in rec:
        parts += described
        if math.isfinite(rec["test_fwd_nstep"]):  # a model with DEQ info
            parts.append(f"fwd steps {rec['test_fwd_nstep']:.1f}")
            parts.append(f"res {rec['test_fwd_residual']:.2e}")
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']} steps")
    parts.append(f"{seconds:.1f}s")
    return "  ".join(parts)


def draw_run_curves(out_dir: Path, metrics: tuple[str, ...] = ("loss", "acc")) -> None:
    """``curves.png`` from ``metrics.jsonl`` of the run in ``out_dir`` (the task's ``metrics``,
    :func:`plot_curves`); never raises."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return
    try:
        plot_curves(path, out_dir / "curves.png", metrics)
    except Exception as exc:  # a plot must never hide the training outcome
        print(f"phantomdeq: could not draw curves.png: {exc}", file=sys.stderr)


def mean_forward_steps(path: Path) -> float:
    """The mean forward-solver steps of the trained (DEQ, not skipped) steps ``metrics.jsonl``
    records, NaN for none."""
    if not path.is_file():
        return math.nan
    rows = [
        r
        for r in read_metrics(path)
        if r.get("kind") == "step" and r.get("stage") == "deq" and not r.get("skipped")
    ]
    vals = [float(r["fwd_nstep"]) for r in rows if isinstance(r.get("fwd_nstep"), int | float)]
    return float(np.mean(vals)) if vals else math.nan
