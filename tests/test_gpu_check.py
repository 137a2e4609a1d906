"""benchmarks/gpu_check.py, the one GPU script: its ``--dry-run`` runs every part on the CPU at
tiny sizes and writes the one JSON (so the script cannot rot between GPU sessions); a bad
``--parts`` is refused."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = (
    "cuda_tests",
    "solver_overhead",
    "precision",
    "tiny_epoch",
    "vs_torchdeq",
    "digits_bf16",
    "lm_tokens",
)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_one_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["dry_run"] is True and payload["machine"]["device"] == "cpu"
    assert list(payload["parts"]) == list(PARTS)
    for name, part in payload["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        if part["status"] == "skipped":
            assert part["reason"], name
            continue
        assert part["headline"], name  # every part that ran reports its numbers
        for value in part["headline"].values():
            assert value is None or not isinstance(value, float) or math.isfinite(value), name
    parts = payload["parts"]
    assert parts["cuda_tests"]["headline"]["collected"] > 0
    assert parts["tiny_epoch"]["headline"]["epoch_time_s"] > 0
    assert all(v > 0 for v in parts["solver_overhead"]["headline"].values())
    assert all(v > 0 for v in parts["precision"]["headline"].values())


def test_unknown_parts_are_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--parts", "fast", "--work", str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--parts" in proc.stderr and "solver_overhead" in proc.stderr
