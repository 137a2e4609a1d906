"""``phantomdeq ablate``: a 2 x 2 grid trains, writes the table, JSON and figure; a rerun skips
finished runs; the IFT axis collapses over k / λ; bad grid keys or values stop before any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phantomdeq.experiments import ablation

CONFIG = """\
model:
  name: mdeq_tiny
  dropout: 0.0
  overrides:
    channels: [8, 8]
    head_channels: [4, 4]
    final_channels: 16
    expansion: 2
    num_groups: 4
data:
  name: digits
  train_size: 48
  test_size: 40
  batch_size: 16
  eval_batch_size: 40
solver:
  name: anderson
  max_iter: 4
  tol: 1.0e-3
grad:
  name: upg
  k: 2
  lam: 0.5
  backward_solver:
    name: fixed_point
    max_iter: 4
    tol: 1.0e-4
optim:
  name: adam
  lr: 1.0e-2
  weight_decay: 0.0
train:
  epochs: 1
  seed: 0
  num_threads: 1
log:
  progress: false
  tensorboard: false
  plot: false
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(CONFIG)
    return p


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "runs").iterdir() if p.is_dir())


def test_ablate_grid_table_json_figure_and_resume(config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    argv = ["--config", str(config), "--grid", "k=1,2", "--grid", "lam=0.5,1.0", "--seeds", "1"]
    argv += ["--out", str(out)]
    assert ablation.main(argv) == 0
    table = (out / "table.md").read_text()
    doc = json.loads((out / "ablation.json").read_text())
    assert (out / "fig3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 2 x 2 grid, one seed: four configurations, each a table row with an accuracy in [0, 100]
    assert len(doc["rows"]) == 4 and len(doc["runs"]) == 4
    assert {(r["k"], r["lam"]) for r in doc["rows"]} == {(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)}
    for row in doc["rows"]:
        assert row["n_runs"] == 1 and row["n_failed"] == 0
        assert 0.0 <= row["acc_mean"] <= 1.0 and row["acc_best"] == row["acc_mean"]
        assert row["epoch_time_s"] > 0 and row["train_fwd_nstep"] <= 4
        assert f"{100 * row['acc_mean']:.2f} ({100 * row['acc_best']:.2f})" in table
    assert table.count("\n") == 2 + 4  # header, rule, four rows
    assert "UPG A_{2,0.5}" in capsys.readouterr().out

    # Rerun: nothing is trained again (the run directories and results are untouched).
    stamps = {p.name: (p / "result.json").stat().st_mtime_ns for p in _run_dirs(out)}
    assert ablation.main(argv) == 0
    assert "0 to run" in capsys.readouterr().err
    assert {p.name: (p / "result.json").stat().st_mtime_ns for p in _run_dirs(out)} == stamps


def test_ift_collapses_over_k_and_lam(config: Path) -> None:
    grid = ablation.parse_grid(["grad=ift,upg", "k=1,2", "lam=0.5,1.0"])
    specs = ablation.plan_runs([config], grid, seeds=2)
    ift = [s for s in specs if s.config["grad"]["name"] == "ift"]
    upg = [s for s in specs if s.config["grad"]["name"] == "upg"]
    assert len(ift) == 2  # one configuration x two seeds, whatever k and λ
    assert len(upg) == 2 * 2 * 2
    assert {s.seed for s in ift} == {0, 1}
    assert len({s.key for s in upg}) == 4
    assert all("k=" not in s.label for s in ift)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["foo=1,2"], "unknown key 'foo'"),
        (["optim.nme=sgd"], "optim.nme: unknown key"),
        (["grad=ift,sgd"], "grad.name: input should be 'ift'"),
        (["k=1,0"], "grad.k: UPG: k must be an integer >= 1"),
        (["lam=0.5,1.5"], "grad.lam: UPG: lam must be in (0, 1]"),
        (["k=1,1"], "given twice"),
        (["k="], "expected KEY=V1,V2"),
    ],
)
def test_bad_grid_is_rejected_before_any_run(
    config: Path, tmp_path: Path, capsys, grid: list[str], message: str
) -> None:
    out = tmp_path / "bad"
    # a valid axis first: the whole grid is validated before the first (valid) run could start
    argv = ["--config", str(config), "--out", str(out), "--grid", "lr=0.01,0.02"]
    for g in grid:
        argv += ["--grid", g]
    assert ablation.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (out / "runs").exists()
