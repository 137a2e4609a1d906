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
from types import ModuleType

import pytest
import yaml

from conftest import load_file
from phantomdeq.train import config_from_dict

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


def _load_script() -> ModuleType:
    return load_file(SCRIPT, "gpu_check_under_test")


def test_lm_part_times_the_gpu_preset_at_its_batch(tmp_path: Path) -> None:
    mod = _load_script()
    preset = mod._lm_preset()
    assert preset == ROOT / "configs" / "deq_lm_shakespeare_gpu.yaml"
    cfg = config_from_dict(yaml.safe_load(preset.read_text()))
    assert cfg.task.name == "language_modelling" and cfg.data.name == "text"
    assert cfg.model.target == "phantomdeq.models.deq_lm:DEQTransformerLM"
    kwargs = cfg.model.kwargs
    assert (kwargs["width"], kwargs["heads"], cfg.data.context) == (384, 6, 256)
    assert (cfg.data.batch_size, cfg.train.precision, cfg.train.device) == (64, "bf16", "cuda")
    assert cfg.solver.name == "anderson"
    assert (cfg.grad.name, cfg.grad.k, cfg.grad.lam) == ("upg", 5, 0.5)

    def option(cmd: list[str], flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    gpu = mod._lm_cmd(mod.Context(dry=False, work=tmp_path))[0]
    assert option(gpu, "--config") == str(preset) and option(gpu, "--batch") == "64"
    assert option(gpu, "--precisions") == "fp32,bf16" and option(gpu, "--device") == "cuda"
    assert "--set" not in gpu  # the preset as it ships
    dry = mod._lm_cmd(mod.Context(dry=True, work=tmp_path))[0]
    assert option(dry, "--device") == "cpu" and "model.kwargs.width=32" in dry


def test_lm_preset_falls_back_and_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _load_script()
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    (tmp_path / "configs").mkdir()
    ctx = mod.Context(dry=True, work=tmp_path)
    assert mod._lm_preset() is None and "deq_lm" in mod._lm_skip(ctx)
    (tmp_path / "configs" / "deq_lm_b.yaml").write_text("data: {batch_size: 12}\n")
    (tmp_path / "configs" / "deq_lm_a.yaml").write_text("data: {batch_size: 12}\n")
    assert mod._lm_preset() == tmp_path / "configs" / "deq_lm_a.yaml"
    assert mod._lm_skip(ctx) is None and mod._lm_batch(mod._lm_preset()) == 12


def test_lm_headline_reads_tokens_per_second(tmp_path: Path) -> None:
    mod = _load_script()
    records = [
        {"precision": "fp32", "median_step_s": 0.2, "median_tokens_per_s": 81920.0},
        {"precision": "bf16", "median_step_s": 0.1, "median_tokens_per_s": 163840.0},
    ]
    payload = {"config": "/x/deq_lm_shakespeare_gpu.yaml", "batch": 64, "records": records}
    (tmp_path / "lm_tokens.json").write_text(json.dumps(payload))
    head = mod._lm_headline(mod.Context(dry=False, work=tmp_path))
    assert head["preset"] == "deq_lm_shakespeare_gpu.yaml"
    assert head["fp32_tokens_per_s"] == 81920.0 and head["bf16_tokens_per_s"] == 163840.0
    assert head["bf16_over_fp32_step"] == pytest.approx(0.5)
    assert mod._lm_headline(mod.Context(dry=False, work=tmp_path / "none")) == {}
