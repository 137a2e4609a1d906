"""The one figure style of the package: matplotlib (optional, the ``plots`` extra) with the
non-interactive Agg backend, ``tight_layout`` and one resolution for every written figure."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DPI = 110


@contextlib.contextmanager
def saved_figure(path: str | Path, *args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(*args, **kwargs)`` as ``(fig, axes)``; on leaving the block the figure is
    laid out, written to ``path`` (parent folders created) and closed. Raises ``ImportError``
    when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)
