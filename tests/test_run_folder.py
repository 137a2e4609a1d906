"""The command line never clobbers a run and reports every user error on one line with exit
status 2: run folders (--resume / --overwrite / a file as --out / no empty folder left by a
failed setup), invalid solver options, impossible data sizes, and checkpoints that cannot be
evaluated (NaN weights, another model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config

yaml = pytest.importorskip("yaml")
pytest.importorskip("sklearn")

from phantomdeq.cli import main as cli  # noqa: E402
from phantomdeq.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from phantomdeq.train.metrics_log import read_metrics  # noqa: E402


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], prog: str = "phantomdeq train") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err


def train(config: Path, out: Path, *extra: str) -> int:
    return cli(["train", "--config", str(config), "--out", str(out), "--no-progress", *extra])


# --------------------------------------------------------------------------- run folders


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert train(config_file, run) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert train(config_file, run, "--set", "train.epochs=2") == 2
    err = one_line_error(capsys)
    assert f"--out: folder {str(run)!r} already holds a run" in err
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.slow
def test_overwrite_replaces_the_run_and_says_what_it_deleted(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert train(config_file, run, "--set", "train.epochs=2") == 0
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert train(config_file, run, "--overwrite") == 0
    err = capsys.readouterr().err
    assert "--overwrite: deleted the previous run's config.yaml, metrics.jsonl, last.pt" in err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert [r["kind"] for r in read_metrics(run / "metrics.jsonl")] == ["step", "epoch"]
    assert (run / "notes.txt").read_text() == "mine"  # not a file a run writes


@pytest.mark.slow
def test_a_folder_in_use_by_another_process_is_refused_until_that_process_ends(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # e.g. an orphaned worker of a killed `phantomdeq ablate` still training into the folder:
    # neither --overwrite nor --resume may touch it while that process lives (a SIGKILL ends
    # the lock with the process: no stale lock is left behind)
    import subprocess
    import sys

    run = tmp_path / "run"
    assert train(config_file, run) == 0
    capsys.readouterr()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from phantomdeq.train.run_dir import prepare_run_folder\n"
            "f = prepare_run_folder(sys.argv[1], resume=True, overwrite=False)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        for flag in ("--overwrite", "--resume"):
            assert train(config_file, run, flag, "--set", "train.epochs=2") == 2
            err = one_line_error(capsys)
            assert f"is in use by another process (pid {holder.pid})" in err, err
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert train(config_file, run, "--resume", "--set", "train.epochs=2") == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_resume_and_overwrite_exclude_each_other(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(config_file, tmp_path / "run", "--resume", "--overwrite") == 2
    assert "--resume and --overwrite exclude each other" in one_line_error(capsys)


def test_out_pointing_at_a_file(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert train(config_file, target) == 2
    assert f"--out: {str(target)!r} is a file, not a folder" in one_line_error(capsys)
    assert cli(["train", "--out", str(target), "--resume"]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert target.read_text() == "keep me"


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_from_the_beginning(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed before its first checkpoint leaves config.yaml and a partial
    metrics.jsonl: --resume starts it again and drops the partial records."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    (run / "metrics.jsonl").write_text('{"kind": "step", "epoch": 1, "batch": 1, "step": 1}\n{"ki')
    assert cli(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    assert [r["kind"] for r in read_metrics(run / "metrics.jsonl")] == ["step", "epoch"]


def test_a_failed_setup_leaves_no_folder_behind(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """data.train_size above the size of the data set (1438 training images): one line naming
    the option and the value, status 2 (a traceback before), and no (nested) output folder is
    left behind."""
    out = tmp_path / "new" / "run"
    assert train(config_file, out, "--set", "data.train_size=100000") == 2
    err = one_line_error(capsys)
    assert "train_size=100000 exceeds the 1438 examples of the digits training split" in err
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    ("setting", "pattern"),
    [
        ("solver.beta=0", "solver.beta: Anderson: beta must be in (0.0, 1.0], got 0.0"),
        (
            "solver.beta=nan",
            "solver.beta: Anderson: beta must be a finite number in (0.0, 1.0], got nan",
        ),
        ("solver.lam=-1", "solver.lam: Anderson: lam must be in [0.0, inf), got -1.0"),
        (
            "grad.backward_solver.beta=2",
            "grad.backward_solver.beta: Anderson: beta must be in (0.0, 1.0], got 2.0",
        ),
    ],
)
def test_invalid_solver_options_are_one_line_errors(
    tmp_path: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    pattern: str,
) -> None:
    assert train(config_file, tmp_path / "run", "--set", setting) == 2
    assert pattern in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- eval


@pytest.fixture
def trained(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    run = tmp_path / "trained"
    assert train(config_file, run) == 0
    capsys.readouterr()
    return run


@pytest.mark.slow
def test_eval_of_a_nan_checkpoint(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint with NaN weights (consistent hash: e.g. written by an older version) used
    to end in a DEQError traceback; now one line naming the file and the tensor."""
    state = load_checkpoint(trained / "last.pt")
    name = next(k for k, v in state["model"].items() if k.endswith("weight"))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    path = save_checkpoint(tmp_path / "nan.pt", state)
    assert cli(["eval", "--checkpoint", str(path), "--device", "cpu"]) == 2
    err = one_line_error(capsys, "phantomdeq eval")
    assert f"checkpoint {str(path)!r} holds non-finite values (NaN/inf) in {name!r}" in err


@pytest.mark.slow
def test_eval_of_another_model_names_the_config_keys(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint's weights against a model with other head widths: one line naming
    model.overrides (49 lines of size mismatches before)."""
    code = cli(
        ["eval", "--checkpoint", str(trained / "last.pt"), "--device", "cpu"]
        + ["--set", "model.overrides={final_channels: 64}"]
    )
    assert code == 2
    err = one_line_error(capsys, "phantomdeq eval")
    assert "holds another model than the one requested: model.overrides differ(s)" in err
    assert "tensor(s) differ in shape, e.g." in err


@pytest.mark.slow
def test_eval_of_weights_that_do_not_fit_their_own_config(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = load_checkpoint(trained / "last.pt")
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
    path = save_checkpoint(tmp_path / "partial.pt", state)
    assert cli(["eval", "--checkpoint", str(path), "--device", "cpu"]) == 2
    err = one_line_error(capsys, "phantomdeq eval")
    assert "does not match the model 'mdeq_tiny' built from its config" in err
    assert "missing from the checkpoint, e.g. 'head." in err


@pytest.mark.slow
def test_eval_still_works(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["eval", "--checkpoint", str(trained / "best.pt"), "--device", "cpu"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["test_acc"] <= 1.0
