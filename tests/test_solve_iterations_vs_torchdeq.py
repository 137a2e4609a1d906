"""benchmarks/solve_iterations_vs_torchdeq.py: recorded training solves compared with both
libraries' Anderson (counts within the budget, each library's iterate checked), a clean skip
without TorchDEQ, and bad options refused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest

from conftest import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "solve_iterations_vs_torchdeq.py"
DIGITS = ["--set", "data.name=digits", "--set", "data.root=null"]


def _load() -> ModuleType:
    return load_file(SCRIPT, "solve_iterations_under_test", sibling_imports=True)


def test_records_training_solves_and_counts_both_libraries(tmp_path: Path) -> None:
    pytest.importorskip("torchdeq", reason="TorchDEQ 0.1.0 (the peer extra) is not installed")
    mod = _load()
    out = tmp_path / "iters.json"
    args = [*DIGITS, "--steps", "2", "--solves", "3", "--threads", "1", "--out", str(out)]
    assert mod.main(args) == 0
    rec = json.loads(out.read_text())
    budget = rec["config_solver"]["max_iter"]
    assert len(rec["rows"]) == 3
    for row in rec["rows"]:
        for lib in ("phantomdeq", "torchdeq"):
            evals = row[f"evals_{lib}"]
            # a solve evaluates f at least once and never beyond its budget; the reported best
            # iterate is one of those evaluated
            assert 1 <= evals <= budget
            assert 1 <= row[f"nstep_{lib}"] <= evals
            assert math.isfinite(row[f"worst_rel_{lib}"])
        # phantomdeq returns the iterate whose residual it measured: below the tolerance when
        # the solve stopped before its budget
        if row["evals_phantomdeq"] < budget:
            assert row["worst_rel_phantomdeq"] <= rec["config_solver"]["tol"] * (1 + 1e-4)
    assert rec["summary"]["solves_with_equal_evals"] <= 3


def test_skips_cleanly_without_torchdeq(monkeypatch, capsys, tmp_path: Path) -> None:
    mod = _load()
    monkeypatch.setattr(mod.tta, "_import_torchdeq", lambda: None)
    assert mod.main([*DIGITS, "--out", str(tmp_path / "x.json")]) == 0
    assert "TorchDEQ is not importable" in capsys.readouterr().out
    assert not (tmp_path / "x.json").exists()


def test_bad_options_are_refused() -> None:
    mod = _load()
    with pytest.raises(SystemExit) as err:
        mod.main([*DIGITS, "--solves", "0"])
    assert err.value.code == 2
