"""The command line never clobbers a run and reports every user error on one line with exit
status 2: run folders (--resume / --overwrite / a file as --out / no empty folder left by a
failed setup), invalid solver options, impossible data sizes, and checkpoints that cannot be
evaluated (NaN weights, another model)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_config

yaml = pytest.importorskip("yaml")
pytest.importorskip("sklearn")

from phantomdeq.cli import main as cli  # noqa: E402
from phantomdeq.train.metrics import read_metrics  # noqa: E402
from phantomdeq.train.run_folder import load_checkpoint, save_checkpoint  # noqa: E402


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
            "from phantomdeq.train.run_folder import prepare_run_folder\n"
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


# --------------------------------------------------------------------------- nothing lost


def _files(run: Path) -> dict[str, bytes]:
    """The run's files (not the folder's lock, which any use of the folder writes)."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name[0] != "."}


def _epoch_records(run: Path) -> list[dict[str, Any]]:
    # wall-clock and CPU-time fields (train_cpu_s) differ between any two runs
    timing = ("time", "cpu_s", "eval_time_s", "epoch_time_s", "time_s", "time_per_step_s")
    return [
        {k: v for k, v in r.items() if not any(t in k for t in timing)}
        for r in read_metrics(run / "metrics.jsonl")
        if r["kind"] == "epoch"
    ]


def test_resume_without_last_pt_continues_from_best_pt_bit_for_bit(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """last.pt deleted, best.pt (the complete state after epoch 1) and the history of 2 epochs
    left: fewer epochs than the history are refused with nothing changed; --resume continues
    from best.pt, drops the records after it, trains epoch 2 again and ends where the run
    ended (was: restarted from epoch 1, history emptied, config.yaml rewritten)."""
    run = tmp_path / "run"
    assert train(config_file, run) == 0
    after_epoch_1 = (run / "last.pt").read_bytes()
    assert train(config_file, run, "--resume", "--set", "train.epochs=2") == 0
    final = load_checkpoint(run / "last.pt")
    history = _epoch_records(run)
    (run / "last.pt").unlink()
    (run / "best.pt").write_bytes(after_epoch_1)
    capsys.readouterr()
    before = _files(run)
    assert cli(["train", "--out", str(run), "--resume", "--set", "train.epochs=1"]) == 2
    err = one_line_error(capsys)
    assert "train.epochs: the run in" in err and "already trained 2 epoch(s)" in err
    assert _files(run) == before
    assert cli(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "no last.pt in" in err and "resuming from best.pt" in err and "after epoch 1" in err
    again = load_checkpoint(run / "last.pt")
    assert again["epoch"] == 2 and again["step"] == final["step"]
    assert all(torch.equal(again["model"][k], v) for k, v in final["model"].items())
    assert _epoch_records(run) == history
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2


def test_a_history_without_any_checkpoint_is_not_restarted(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two epochs recorded and no checkpoint: they were deleted (a kill before the first
    checkpoint leaves one epoch at most, which a restart trains again as it was)."""
    for name in ("last.pt", "best.pt"):
        (trained / name).unlink()
    metrics = trained / "metrics.jsonl"
    epoch_1 = json.loads(metrics.read_text().splitlines()[-1])
    with metrics.open("a") as fh:
        fh.write(json.dumps({**epoch_1, "epoch": 2, "step": 2}) + "\n")
    before = _files(trained)
    assert cli(["train", "--out", str(trained), "--resume", "--set", "train.epochs=3"]) == 2
    err = one_line_error(capsys)
    assert "has no last.pt nor best.pt" in err and "records 2 trained epoch(s)" in err
    assert "nothing was changed" in err and "--overwrite" in err
    assert _files(trained) == before
    # one epoch recorded (killed between its record and its checkpoint): trained again
    metrics.write_bytes(b"".join(metrics.read_bytes().splitlines(keepends=True)[:-1]))
    assert cli(["train", "--out", str(trained), "--resume", "--no-progress"]) == 0
    assert "starting the run from the beginning" in capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(metrics) if r["kind"] == "epoch"] == [1]
    assert load_checkpoint(trained / "last.pt")["epoch"] == 1


def test_restarting_a_run_without_checkpoint_keeps_its_config(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed in its first epoch: --resume starts again only with the config it started with
    (a larger train.epochs is fine)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    (run / "metrics.jsonl").write_text('{"kind": "step", "epoch": 1, "batch": 1, "step": 1}\n')
    before = _files(run)
    assert train(config_file, run, "--resume", "--set", "optim.lr=0.1") == 2
    err = one_line_error(capsys)
    assert "differs from its config.yaml in optim.lr" in err and "--overwrite" in err
    assert _files(run) == before


def test_an_emptied_or_deleted_metrics_file_is_reported_on_resume(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (trained / "metrics.jsonl").write_text("")
    assert cli(["train", "--out", str(trained), "--resume", "--set", "train.epochs=2"]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl' is empty" in err and "the history up to epoch 1" in err
    assert [
        r["epoch"] for r in read_metrics(trained / "metrics.jsonl") if r["kind"] == "epoch"
    ] == [2]


def test_a_foreign_best_pt_is_refused_not_overwritten(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = load_checkpoint(trained / "best.pt")
    state["config"]["model"]["dropout"] = 0.25
    state["best_acc"] = 0.0
    save_checkpoint(trained / "best.pt", state)
    before = _files(trained)
    assert cli(["train", "--out", str(trained), "--resume", "--set", "train.epochs=2"]) == 2
    err = one_line_error(capsys)
    assert f"{str(trained / 'best.pt')!r} holds another model" in err
    assert "model.dropout" in err and "move it out" in err
    assert _files(trained) == before


def test_an_unverified_checkpoint_is_said(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = torch.load(trained / "best.pt", weights_only=True)
    del raw["sha256"]
    torch.save(raw, trained / "best.pt")
    assert cli(["eval", "--checkpoint", str(trained / "best.pt"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "phantomdeq: checkpoint" in err and "no sha256 hash" in err and "unverified" in err


def test_an_empty_config_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert train(empty, tmp_path / "run") == 2
    err = one_line_error(capsys)
    assert f"config file {str(empty)!r} is empty" in err and "{}" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the environment


def test_out_under_a_file_is_one_line(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for extra in ((), ("--resume",)):
        assert train(config_file, afile / "sub", *extra) == 2
        err = one_line_error(capsys)
        assert f"lies under {str(afile)!r}, which is a file, not a folder" in err
    assert afile.read_text() == "keep me"


def _refuse_writes(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """The run folder's lock file cannot be opened for writing, as on a read-only file system
    (the tests run as root, for whom chmod does not make a folder read-only)."""
    import os

    import phantomdeq.train.run_folder as run_dir

    def refused(file: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code), str(file))

    monkeypatch.setattr(run_dir, "open", refused, raising=False)


@pytest.mark.parametrize("code", ["EROFS", "EACCES"])
def test_a_read_only_folder_is_one_line_for_train_and_resume(
    tmp_path: Path,
    trained: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    code: str,
) -> None:
    import errno

    before = _files(trained)
    _refuse_writes(monkeypatch, getattr(errno, code))
    words = {"EROFS": "read-only file system", "EACCES": "permission denied"}[code]
    assert cli(["train", "--out", str(trained), "--resume", "--set", "train.epochs=2"]) == 2
    err = one_line_error(capsys)
    assert f"--out: cannot write in folder {str(trained)!r}: {words} ({code}" in err
    assert "nothing in it was changed" in err
    assert _files(trained) == before
    fresh = tmp_path / "new" / "run"
    assert train(config_file, fresh) == 2
    assert f"cannot write in folder {str(fresh)!r}: {words}" in one_line_error(capsys)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert load_checkpoint(trained / "last.pt")["epoch"] == 1


def test_no_space_while_rewriting_metrics_is_one_line_and_keeps_the_files(
    trained: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import phantomdeq.train.run_folder as atomic

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    before = _files(trained)
    monkeypatch.setattr(atomic.os, "fsync", full)
    assert cli(["train", "--out", str(trained), "--resume", "--set", "train.epochs=2"]) == 2
    monkeypatch.undo()
    err = one_line_error(capsys)
    path = trained / "metrics.jsonl"
    assert f"cannot write {str(path)!r}: no space left on the device (ENOSPC" in err
    assert "metrics.jsonl is unchanged" in err and "then continue with:" in err
    assert _files(trained) == before
    assert not [p.name for p in trained.iterdir() if p.name.endswith(".tmp")]


def test_a_file_size_limit_while_saving_a_checkpoint_is_one_line(
    trained: Path, config_file: Path
) -> None:
    """A real failed write (Errno 27 under RLIMIT_FSIZE, SIGXFSZ ignored) in a fresh process:
    torch.save's RuntimeError becomes one line naming the checkpoint; the previous checkpoint
    and the metrics still load."""
    import subprocess
    import sys

    limit = (trained / "last.pt").stat().st_size // 2
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from phantomdeq.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["train", "--out", str(trained), "--resume", "--no-progress", "--set", "train.epochs=2"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("phantomdeq train:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(rf"cannot write '{re.escape(str(trained))}/(best|last)\.pt'", lines[0])
    assert "(EFBIG" in lines[0] and "then continue with:" in lines[0]
    assert load_checkpoint(trained / "last.pt")["epoch"] == 1
    assert [r["kind"] for r in read_metrics(trained / "metrics.jsonl")][-1] == "epoch"
