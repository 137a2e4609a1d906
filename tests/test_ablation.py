"""``phantomdeq ablate``: a 2 x 2 grid trains, writes the table, JSON and figure; a rerun skips
finished runs; the IFT axis collapses over k / λ; bad grid keys or values stop before any run."""

from __future__ import annotations

import json
import math
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


@pytest.mark.slow
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
        # gradient norms before clipping, from every DEQ step's metrics.jsonl record
        assert 0 < row["grad_norm_median"] <= row["grad_norm_max"] < math.inf
        assert f"| {row['grad_norm_median']:.3g} / {row['grad_norm_max']:.3g} |" in table
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


def _row(label: str, grad: str, k: int | None, lam: float | None, accs: dict[int, float]) -> dict:
    import statistics

    vals = list(accs.values())
    return {
        "label": label,
        "source": "preset.yaml",
        "method": label,
        "grad": grad,
        "k": k,
        "lam": lam,
        "pretrain_steps": 0,
        "dropout": 0.0,
        "optimizer": "adam",
        "fwd_max_iter": 8,
        "train_fwd_nstep": 8.0,
        "epoch_time_s": 1.0,
        "acc": vals,
        "acc_by_seed": accs,
        "acc_mean": statistics.fmean(vals),
        "acc_std": statistics.stdev(vals) if len(vals) > 1 else None,
        "acc_best": max(vals),
        "n_runs": len(vals),
        "n_failed": 0,
    }


def test_table_prints_na_for_the_spread_of_one_seed() -> None:
    from phantomdeq.experiments.report import table_markdown

    one = _row("one", "upg", 5, 0.5, {0: 0.9})
    two = _row("two", "upg", 5, 1.0, {0: 0.9, 1: 0.92})
    lines = table_markdown([one, two]).splitlines()
    assert one["acc_std"] is None
    assert "| n/a | 1 (0) |" in lines[2]  # not "± 0.00": one run has no spread
    assert "| 1.41 | 2 (0) |" in lines[3]  # stdev of 90 and 92 is sqrt(2)


def test_fig3_only_for_a_k_grid_and_only_with_the_k_values_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phantomdeq.experiments.report import _draw_fig3, is_k_grid, plot_fig3

    # a grid over another key (k fixed at 5): no "accuracy vs k" figure
    flat = [
        _row("bn=0", "upg", 5, 0.5, {0: 0.90, 1: 0.91}),
        _row("bn=4", "upg", 5, 0.5, {0: 0.92, 1: 0.93}),
        _row("ift", "ift", None, None, {0: 0.91, 1: 0.92}),
    ]
    assert not is_k_grid(flat)
    assert plot_fig3(flat, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()

    rows = [
        _row("k=1", "upg", 1, 0.5, {0: 0.88, 1: 0.89}),
        _row("k=3", "upg", 3, 0.5, {0: 0.90, 1: 0.91}),
        _row("k=9", "upg", 9, 0.5, {0: 0.92, 1: 0.92}),
        _row("ift", "ift", None, None, {0: 0.91, 1: 0.92}),
    ]
    assert is_k_grid(rows)
    fig, ax = plt.subplots()
    _draw_fig3(ax, {("upg", 0.5, "preset.yaml"): rows[:3]}, rows[3:])
    assert list(ax.get_xticks()) == [1, 3, 9]

    # runs that logged gradient norms get the second panel, on a log scale, same k axis
    from phantomdeq.experiments.report import _draw_grad_norms

    for r, (med, top) in zip(rows[:3], [(1.0, 4.0), (1.5, 8.0), (2.0, 300.0)]):
        r["grad_norm_median"], r["grad_norm_max"] = med, top
    fig, ax = plt.subplots()
    _draw_grad_norms(ax, {("upg", 0.5, "preset.yaml"): rows[:3]})
    assert ax.get_yscale() == "log" and list(ax.get_xticks()) == [1, 3, 9]
    assert list(ax.lines[0].get_ydata()) == [4.0, 8.0, 300.0]
    plt.close(fig)
    assert plot_fig3(rows, tmp_path / "two.png") is not None
    plt.close(fig)
    assert plot_fig3(rows, tmp_path / "fig3.png") == tmp_path / "fig3.png"


def test_paired_difference_by_seed() -> None:
    from phantomdeq.experiments.report import paired_difference

    a = {0: 0.90, 1: 0.95, 2: 0.91, 3: 0.99}
    b = {0: 0.88, 1: 0.96, 2: 0.87}  # seed 3 missing in b: not paired
    res = paired_difference(a, b)
    assert res is not None
    d = [0.02, -0.01, 0.04]
    mean = sum(d) / 3
    sd = (sum((x - mean) ** 2 for x in d) / 2) ** 0.5
    assert res["seeds"] == [0, 1, 2] and res["n"] == 3 and res["wins"] == 2
    assert res["mean"] == pytest.approx(mean, abs=1e-12)
    assert res["se"] == pytest.approx(sd / 3**0.5, abs=1e-12)
    assert paired_difference({0: 0.9}, {0: 0.8})["se"] is None  # type: ignore[index]
    assert paired_difference({0: 0.9}, {1: 0.8}) is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:\tZ") for line in fh)
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc for the worker processes")
def test_sigterm_to_a_parallel_study_stops_its_workers_and_the_study_resumes(
    config: Path, tmp_path: Path
) -> None:
    # SIGTERM to `phantomdeq ablate --jobs 2` is passed to the workers: each running trainer
    # checkpoints and stops, the command exits 143 in one line, no worker trains on after it
    # (an orphan would race the resumed study in the same run folder), and the same command
    # then finishes every run.
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "study"
    study = ["--config", str(config), "--grid", "k=1,2", "--seeds", "1", "--out", str(out)]
    study += ["--set", "train.epochs=20"]
    argv = [sys.executable, "-m", "phantomdeq.cli", "ablate", *study, "--jobs", "2"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    deadline = time.monotonic() + 120

    def training() -> bool:  # some run has logged a step (its set-up is over)
        return any(p.stat().st_size > 0 for p in out.glob("runs/*/metrics.jsonl"))

    while time.monotonic() < deadline and not training():
        time.sleep(0.1)
    assert training(), "no run started"
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        workers |= {int(p) for p in (task / "children").read_text().split()}
    workers = {w for w in workers if "spawn_main" in Path(f"/proc/{w}/cmdline").read_text()}
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert (
        err.strip().splitlines()[-1].startswith("phantomdeq ablate: error: interrupted by SIGTERM")
    )
    time.sleep(0.5)
    assert not [w for w in workers if _alive(w)]
    assert not list(out.glob("runs/*/result.json"))  # 20 epochs: nothing had finished
    assert list(out.glob("runs/*/last.pt"))  # the stopped runs checkpointed: resumable

    assert ablation.main([*study, "--jobs", "1"]) == 0  # here, one run after the other
    results = [json.loads(p.read_text()) for p in out.glob("runs/*/result.json")]
    assert len(results) == 2 and all(r["status"] == "ok" and r["epochs"] == 20 for r in results)


def test_training_interrupted_crosses_process_boundaries() -> None:
    # a worker returns it to `phantomdeq ablate`; an exception that cannot be unpickled there
    # breaks the whole process pool (and used to hang the command on SIGTERM)
    import pickle

    from phantomdeq.train.guard import TrainingInterrupted

    exc = pickle.loads(pickle.dumps(TrainingInterrupted(15, "stopped at step 3", immediate=True)))
    assert (exc.signum, str(exc), exc.immediate, exc.exit_code) == (
        15,
        "stopped at step 3",
        True,
        143,
    )
