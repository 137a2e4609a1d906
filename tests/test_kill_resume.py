"""Crash consistency end to end: a training process killed with SIGKILL at random points
(seeded) and resumed each time ends bit-identical to an uninterrupted run; SIGTERM stops it
gracefully (exit status 143, a resumable checkpoint, the command that continues it).

Small on purpose: 128 digits images, batch 32 (4 steps per epoch), 3 epochs, one thread. The
training processes are forks of the test process running ``phantomdeq train``'s ``main``: real
processes with real signals and exit statuses, without paying the interpreter, torch and
scikit-learn start-up for each."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

yaml = pytest.importorskip("yaml")
pytest.importorskip("sklearn")

from phantomdeq.train import commands, run_training  # noqa: E402
from phantomdeq.train.metrics import read_metrics  # noqa: E402
from phantomdeq.train.run_folder import load_checkpoint  # noqa: E402

pytestmark = [  # training processes killed and resumed: the slow tier
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)"),
]

STEPS = 12  # 3 epochs of 4 steps
CONFIG: dict[str, Any] = {
    "model": {"name": "mdeq_tiny", "dropout": 0.25},
    "data": {
        "name": "digits",
        "train_size": 128,
        "test_size": 64,
        "batch_size": 32,
        "eval_batch_size": 64,
        "augment": True,
        "crop_padding": 1,
    },
    "solver": {"name": "anderson", "max_iter": 6, "tol": 1e-3},
    "grad": {"name": "upg", "k": 2, "lam": 0.5},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "cosine", "warmup_steps": 2},
    "train": {
        "epochs": 3,
        "seed": 1,
        "num_threads": 1,
        "device": "cpu",
        "bn_recalibration_batches": 2,
        "checkpoint_every_steps": 1,
    },
    "log": {"progress": False, "tensorboard": False, "plot": False},
}


def write_config(folder: Path, **train: Any) -> Path:
    raw = {**CONFIG, "train": {**CONFIG["train"], **train}}
    path = folder / "config-in.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Child:
    """``phantomdeq train`` in a forked process; its output goes to ``log``."""

    def __init__(self, config: Path, out: Path, log: Path, *extra: str) -> None:
        self.log = log
        argv = ["--config", str(config), "--out", str(out), "--no-progress", *extra]
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 99
            try:
                fh = open(log, "w", buffering=1)  # noqa: SIM115
                os.dup2(fh.fileno(), 1)
                os.dup2(fh.fileno(), 2)
                sys.stdout = sys.stderr = fh
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = commands.main(argv)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"child still running after {timeout} s")
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode, self.log.read_text()


def metrics_lines(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for_lines(child: Child, out: Path, lines: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while child.poll() is None and metrics_lines(out) < lines:
        if time.monotonic() > end:
            child.kill()
            raise AssertionError(f"no progress to {lines} metrics lines in {timeout} s")
        time.sleep(0.01)


def assert_same_run(reference: Path, run: Path) -> None:
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(reference / name)["model"], load_checkpoint(run / name)["model"]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    ref_rows, rows = read_metrics(reference / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in ref_rows]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]
    assert not list(run.glob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (in this process)."""
    folder = tmp_path_factory.mktemp("reference")
    raw = yaml.safe_load(write_config(folder).read_text())
    run_training(raw, folder / "run", progress=False)
    return folder / "run"


def test_sigkill_at_random_points_then_resume_is_bit_identical(
    reference: Path, tmp_path: Path
) -> None:
    """Four processes killed at seeded random points, each resumed by the next one, then a
    last resume to the end: the parameters, buffers and metrics equal the uninterrupted run's."""
    rng = random.Random(1234)
    config = write_config(tmp_path)
    run = tmp_path / "run"
    kills = 0
    for attempt in range(4):
        child = Child(config, run, tmp_path / f"log{attempt}", *(["--resume"] if attempt else []))
        # kill after a random number of further metrics lines (0: during start-up or the
        # first step), a random fraction of a step later: inside steps, evaluations and
        # checkpoint / metrics writes
        wait_for_lines(child, run, metrics_lines(run) + rng.randint(0, 4))
        time.sleep(rng.uniform(0.0, 0.2))
        if child.poll() is None:
            child.kill()
            kills += 1
        code, log = child.wait()
        assert code in (0, -signal.SIGKILL), log
    assert kills >= 3
    code, log = Child(config, run, tmp_path / "log-final", "--resume").wait()
    assert code == 0, log
    assert_same_run(reference, run)


def test_sigterm_stops_gracefully_and_resumes_bit_identical(
    reference: Path, tmp_path: Path
) -> None:
    """SIGTERM in epoch 2 (no step checkpoints configured): the run finishes its step, writes
    last.pt there, exits 143 with the command that continues it; resuming ends bit-identical."""
    config = write_config(tmp_path, checkpoint_every_steps=0)
    run = tmp_path / "run"
    child = Child(config, run, tmp_path / "log")
    wait_for_lines(child, run, 6)  # epoch 1 (4 steps + epoch record) and one step of epoch 2
    os.kill(child.pid, signal.SIGTERM)
    code, err = child.wait()
    assert code == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("phantomdeq train: error: interrupted by SIGTERM: stopped ")
    assert last.endswith(f"continue with: phantomdeq train --out {run} --resume")
    state = load_checkpoint(run / "last.pt")
    assert state["step"] > 4 and (state["epoch"], state["batch"]) != (1, 0)
    code, log = Child(config, run, tmp_path / "log-resume", "--resume").wait()
    assert code == 0, log
    assert_same_run(reference, run)
