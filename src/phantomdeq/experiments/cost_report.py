"""Reports of the cost experiment (:mod:`.cost`): the Table-2-style table, ``cost.png`` and
the machine description stored with the results."""

from __future__ import annotations

import contextlib
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from phantomdeq._plot import saved_figure

__all__ = ["format_table", "machine", "write_plot"]


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(records: Sequence[dict[str, Any]]) -> str:
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


def write_plot(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``cost.png``: step time and peak memory vs k for UPG, UPG-ckpt and NPG, with IFT,
    OneStep and BPTT as horizontal reference lines."""
    modes = [r.get("mode", "eager") for r in records]
    first = modes[0] if modes else "eager"
    records = [r for r, m in zip(records, modes) if m == first]  # one curve set: the first mode
    with saved_figure(path, 1, 2, figsize=(11, 4.2)) as (fig, axes):
        _draw(records, fig, axes)
    return Path(path)


def _draw(records: Sequence[dict[str, Any]], fig: Any, axes: Any) -> None:
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


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = list(os.getloadavg())
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": model,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": load,
    }
