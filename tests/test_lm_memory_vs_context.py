"""benchmarks/lm_memory_vs_context.py: its ``--dry-run`` measures every configuration at tiny
sizes and writes the JSON the documents quote (so the script cannot rot); bad arguments are
refused before any measurement."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lm_memory_vs_context.py"
DEQ = ("deq_ift", "deq_npg", "deq_upg_ckpt", "deq_upg")


def _script() -> ModuleType:
    return load_file(SCRIPT, "lm_memory_vs_context", sibling_imports=True)


@pytest.mark.parametrize(
    "args",
    [
        ["--attention", "flash"],
        ["--variants", "deq_bptt"],
        ["--contexts", "0,8"],
        ["--depth-layers", "x"],
    ],
)
def test_bad_arguments_are_refused(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert _script().main([*args, "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.slow
def test_dry_run_writes_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert "--dry-run" in payload["command"]
    assert payload["memory_method"] == "profiler_cpu_allocator_events"
    assert payload["machine"]["threads"] == 1 and payload["machine"]["torch"]
    rows = payload["rows"]
    got = {(r["attention"], r["variant"], r["context"]) for r in rows}
    every = {(a, v, t) for a in ("default", "math") for v in (*DEQ, "explicit_4") for t in (8, 16)}
    depth = {(a, v, 16) for a in ("default", "math") for v in ("explicit_8",)} | {
        (a, f"{v}_fixed4", 16) for a in ("default", "math") for v in DEQ
    }
    assert got == every | depth and len(rows) == len(got)
    by = {(r["attention"], r["variant"], r["context"]): r for r in rows}
    for r in rows:
        for key in ("peak_mib", "second_step_peak_mib", "graph_mib", "peak_vs_explicit_4"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        # the step's peak is at least what the graph holds; the first step also allocates
        # the solvers' buffers
        assert r["peak_mib"] >= r["second_step_peak_mib"] >= r["graph_mib"], r
        ref = by[(r["attention"], "explicit_4", r["context"])]
        assert r["peak_vs_explicit_4"] == pytest.approx(r["peak_mib"] / ref["peak_mib"])
        assert r["parameters"] > 0
    for a in ("default", "math"):
        # depth: the explicit model's memory grows with its blocks; the DEQ's does not grow
        # with its solver iterations
        assert by[(a, "explicit_8", 16)]["peak_mib"] > by[(a, "explicit_4", 16)]["peak_mib"]
        for v in DEQ:
            fixed, preset = by[(a, f"{v}_fixed4", 16)], by[(a, v, 16)]
            assert fixed["forward_iterations"] >= preset["forward_iterations"]
            assert fixed["graph_mib"] == pytest.approx(preset["graph_mib"], rel=0.05)
            assert fixed["peak_mib"] == pytest.approx(preset["peak_mib"], rel=0.05)
        # unrolling k steps without checkpoints holds more graph than one step does
        assert by[(a, "deq_upg", 16)]["graph_mib"] > by[(a, "deq_npg", 16)]["graph_mib"]
        assert set(payload["growth"][a]) == {*DEQ, "explicit_4"}
        fit = payload["depth"][a]
        assert fit["layers"] == [4, 8] and fit["per_block_mib"] > 0
        assert set(fit["equivalent"]) == {*DEQ, *(f"{v}_fixed4" for v in DEQ)}
