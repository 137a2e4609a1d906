"""Checkpoints: atomic writes, RNG state round trip, clear errors for corrupted files, exact
resume after an interruption, and a non-finite loss stopping training with the last good
checkpoint intact."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import conftest
from conftest import steps

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from phantomdeq.train import (  # noqa: E402
    Trainer,
    TrainingError,
    TrainingInterrupted,
    commands,
    config_from_dict,
    run_training,
)
from phantomdeq.train.metrics import read_metrics  # noqa: E402
from phantomdeq.train.run_folder import (  # noqa: E402
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

tiny_config = functools.partial(conftest.tiny_config, {"train": {"epochs": 3}})


def _state() -> dict:
    return {
        "model": {"w": torch.arange(6.0)},
        "optimizer": {},
        "scheduler": {},
        "rng": capture_rng_state(),
        "config": {},
        "epoch": 1,
        "step": 3,
    }


def test_save_load_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", _state())
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], torch.arange(6.0)) and back["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failed_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint(tmp_path / "last.pt", _state())
    before = path.read_bytes()

    def broken_save(obj: object, f: object, *a: object, **k: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**_state(), "step": 99})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left on the device (ENOSPC"),
        (errno.EFBIG, "file too large for the file-size limit (ulimit -f)"),
        (errno.EROFS, "read-only file system (EROFS"),
    ],
)
def test_a_write_the_environment_refuses_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    # torch.save reports a failed write as "RuntimeError: [enforce fail at
    # inline_container.cc...]", the OSError only in its context: the error names the file
    from phantomdeq.train import OutputWriteError

    path = save_checkpoint(tmp_path / "last.pt", _state())
    before = path.read_bytes()

    def failing_save(obj: object, f: object, *a: object, **k: object) -> None:
        f.write(b"part of a checkpoint")  # type: ignore[attr-defined]
        try:
            raise OSError(code, os.strerror(code))
        except OSError:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos"
            ) from None

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OutputWriteError) as err:
        save_checkpoint(path, {**_state(), "step": 99})
    msg = str(err.value)
    assert f"cannot write {str(path)!r}: {words}" in msg and "\n" not in msg
    assert "last.pt is unchanged" in msg and err.value.errno == code
    assert isinstance(err.value, OSError)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_checkpoint_without_its_hash_loads_unverified(tmp_path: Path) -> None:
    from phantomdeq.train import UnverifiedCheckpointWarning

    path = save_checkpoint(tmp_path / "last.pt", _state())
    raw = torch.load(path, weights_only=True)
    del raw["sha256"]
    torch.save(raw, path)
    with pytest.warns(UnverifiedCheckpointWarning, match="has no sha256 hash.*unverified"):
        state = load_checkpoint(path)
    assert state["step"] == 3
    notes: list[str] = []
    load_checkpoint(path, on_unverified=notes.append)  # no warning: told to the caller
    assert len(notes) == 1 and str(path) in notes[0] and "unverified" in notes[0]


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand(2))
    restore_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign"])
def test_corrupted_checkpoint_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    path = save_checkpoint(tmp_path / "last.pt", _state())
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint\xff" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_cli_reports_corrupted_and_missing_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a checkpoint given to eval is the user's input: exit status 2, one line
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"PK\x03\x04 broken zip")
    assert commands.eval_main(["--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "phantomdeq eval: error: checkpoint" in err and str(bad) in err and "corrupted" in err
    assert err.count("\n") == 1
    assert commands.eval_main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    # --resume on a run directory whose last.pt is damaged
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config(train={"epochs": 1})))
    (run / "last.pt").write_bytes(b"garbage")
    assert commands.main(["--out", str(run), "--resume", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(run / "last.pt") in err and "corrupted" in err


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a checkpoint's model."""
    return load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def resume_config(**train: Any) -> dict[str, Any]:
    """Dropout (variational, 0.25), augmentation, SGD momentum, a cosine schedule with warm-up:
    3 epochs of 4 steps (64 images, batch 16)."""
    return tiny_config(
        model={"dropout": 0.25},
        data={"batch_size": 16, "augment": True, "crop_padding": 1},
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "cosine", "warmup_steps": 1},
        train={"epochs": 3, **train},
    )


@pytest.fixture
def global_rng_in_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every training step draw from the global torch RNG and let the draw change the
    update (the loss is scaled by a random factor), so that a resume which does not restore
    the global RNG state mid-epoch changes the parameters."""
    real_ce = torch.nn.functional.cross_entropy

    def ce(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_ce(*args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":  # training steps, not evaluation
            out = out * (1.0 + 0.5 * torch.rand(()))
        return out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)


def _stop_at(monkeypatch: pytest.MonkeyPatch, call: int, how: str) -> None:
    """Make the ``call``-th training step (1-based) of the next run either raise a plain
    KeyboardInterrupt (a hard stop: nothing is written) or deliver SIGINT to this process
    (the graceful stop: the step completes and last.pt is written there)."""
    original = Trainer._train_step
    calls = {"n": 0}

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == call:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", step)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("train", "stop_call", "how", "position"),
    [
        # hard stop in epoch 2: resumes from the epoch-1 checkpoint
        ({}, 6, "raise", (1, 0, 4)),
        # SIGINT during step 7 (epoch 2, batch 3): last.pt written mid-epoch after that step
        ({}, 7, "signal", (1, 3, 7)),
        # hard stop at step 10 with step checkpoints every 3 steps: resumes from step 9
        ({"checkpoint_every_steps": 3}, 10, "raise", (2, 1, 9)),
    ],
    ids=["epoch-end", "sigint-mid-epoch", "step-checkpoint"],
)
def test_resume_is_bit_identical(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    global_rng_in_loss: None,
    train: dict[str, Any],
    stop_call: int,
    how: str,
    position: tuple[int, int, int],
) -> None:
    """A run stopped at an epoch end, mid-epoch by SIGINT, or after a step checkpoint and then
    resumed ends with parameters and buffers torch.equal to an uninterrupted run's, and with
    the same metrics records (no duplicates, none missing)."""
    cfg = config_from_dict(resume_config(**train))
    full = tmp_path / "full"
    run_training(cfg, full, progress=False)

    part = tmp_path / "part"
    real_step = Trainer._train_step
    _stop_at(monkeypatch, stop_call, how)
    with pytest.raises((KeyboardInterrupt, TrainingInterrupted)):
        run_training(cfg, part, progress=False)
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    state = load_checkpoint(part / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == position
    result = run_training(cfg, part, resume=True, progress=False)
    assert result["steps"] == 12 and result["epochs"] == 3

    assert_same_weights(full / "last.pt", part / "last.pt")
    assert_same_weights(full / "best.pt", part / "best.pt")
    assert [r["step"] for r in steps(part)] == list(range(1, 13))
    assert [r["train_loss"] for r in steps(part)] == [r["train_loss"] for r in steps(full)]
    epochs_full = [r for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "epoch"]
    epochs_part = [r for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "epoch"]
    for a, b in zip(epochs_full, epochs_part, strict=True):
        assert (a["train_loss"], a["test_acc"]) == (b["train_loss"], b["test_acc"])


@pytest.mark.slow
def test_sigint_message_and_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI: SIGINT during a step -> exit 130, one line with the position and the command
    that continues the run."""
    import yaml

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(resume_config()))
    run = tmp_path / "run"
    _stop_at(monkeypatch, 2, "signal")
    code = commands.main(["--config", str(cfg_path), "--out", str(run), "--no-progress"])
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("phantomdeq train: error: interrupted by SIGINT: stopped in epoch 1")
    assert f"continue with: phantomdeq train --out {run} --resume" in err[-1]
    assert load_checkpoint(run / "last.pt")["step"] == 2


@pytest.mark.slow
def test_a_second_signal_stops_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM twice during the first step of epoch 2: no waiting for the step's end; the
    report names the last checkpoint written (epoch 1's) and the handlers are restored."""
    original = Trainer._train_step
    calls = {"n": 0}

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", step)
    cfg = config_from_dict(resume_config())
    with pytest.raises(TrainingInterrupted) as exc:
        run_training(cfg, tmp_path, progress=False)
    assert exc.value.exit_code == 143 and exc.value.immediate
    assert str(exc.value).startswith("SIGTERM received twice; stopped at once; the last")
    assert str(exc.value).endswith("(after epoch 1, step 4)")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


@pytest.mark.slow
def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    raw = tiny_config(train={"epochs": 1})
    run_training(raw, tmp_path, progress=False)
    changed = tiny_config(train={"epochs": 1}, optim={"lr": 0.01})
    with pytest.raises(ValueError, match=r"config differs from the checkpoint's in optim\.lr"):
        run_training(changed, tmp_path, resume=True, progress=False)


@pytest.mark.slow
def test_non_finite_loss_stops_with_last_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tiny_config(data={"batch_size": 32}, train={"epochs": 3})
    real_ce = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def ce(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_ce(*args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":  # training steps only, not evaluation
            calls["n"] += 1
            if calls["n"] == 4:  # second step of epoch 2
                return out * float("nan")
        return out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch 2, step 4") as exc:
        run_training(raw, tmp_path, progress=False)
    assert str(tmp_path / "last.pt") in str(exc.value)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# --------------------------------------------------------------------------- integrity


@pytest.mark.slow
def test_changed_weights_are_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint whose weights were edited after it was written (here 1000 floats negated,
    re-saved with torch.save) fails the content hash; eval reports it on one line, status 2."""
    run = tmp_path / "run"
    run_training(tiny_config(train={"epochs": 1}), run, progress=False)
    path = run / "last.pt"
    load_checkpoint(path)  # intact: loads
    raw = torch.load(path, weights_only=True)
    name = next(k for k, v in raw["model"].items() if v.is_floating_point() and v.numel() >= 1000)
    flat = raw["model"][name].view(-1)
    flat[:1000] = -flat[:1000]
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"damaged: its content does not match the sha256"):
        load_checkpoint(path)
    assert commands.eval_main(["--checkpoint", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "sha256" in err


def test_flipped_bytes_in_the_file_are_refused(tmp_path: Path) -> None:
    """Bytes flipped inside a tensor's record of the file itself (bit rot)."""
    import zipfile

    path = save_checkpoint(tmp_path / "last.pt", {**_state(), "model": {"w": torch.ones(4096)}})
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)  # the 16 KiB weight record
    data = bytearray(path.read_bytes())
    # the record's data follows its 30-byte local header, file name and extra field
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    assert data[start : start + 4] == bytes(torch.ones(1).numpy().tobytes())
    for i in range(start + 100, start + 4000, 4):
        data[i + 3] ^= 0x80  # flip the sign bit of 975 floats
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_permissions_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "last.pt", _state())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.slow
def test_best_is_written_before_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order that keeps best.pt and last.pt consistent under a kill at any instant: an
    improving epoch writes best.pt, then last.pt. A kill between the two writes (simulated at
    the best epoch) leaves best.pt one epoch ahead; the resumed run adopts its accuracy and ends with
    the same best.pt and best accuracy as an uninterrupted run."""
    from phantomdeq.train import run_folder as trainer_module  # where checkpoints are written

    raw = tiny_config(
        data={"batch_size": 32, "train_size": 128, "test_size": 128},
        train={"bn_recalibration_batches": 2, "epochs": 2},
    )
    full = tmp_path / "full"
    full_result = run_training(raw, full, progress=False)
    best_epoch = load_checkpoint(full / "best.pt")["epoch"]
    assert best_epoch == 2  # the accuracy improves: 43 %, then 66 %

    real_save = trainer_module.save_checkpoint
    order: list[tuple[str, int]] = []

    def save(path: Path, state: dict[str, Any]) -> Path:
        order.append((Path(path).name, int(state["epoch"])))
        if Path(path).name == "last.pt" and state["epoch"] == best_epoch:
            raise KeyboardInterrupt  # killed between best.pt and last.pt
        return real_save(path, state)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_training(raw, part, progress=False)
    assert order[-2:] == [("best.pt", best_epoch), ("last.pt", best_epoch)]
    assert load_checkpoint(part / "best.pt")["epoch"] == best_epoch
    assert load_checkpoint(part / "last.pt")["epoch"] == best_epoch - 1
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    result = run_training(raw, part, resume=True, progress=False)
    assert result["best_test_acc"] == full_result["best_test_acc"]
    assert load_checkpoint(part / "best.pt")["best_acc"] == result["best_test_acc"]
    assert_same_weights(full / "best.pt", part / "best.pt")
    assert_same_weights(full / "last.pt", part / "last.pt")


@pytest.mark.slow
def test_stale_temporary_files_are_swept_on_start(tmp_path: Path) -> None:
    raw = tiny_config(train={"epochs": 1})
    run_training(raw, tmp_path, progress=False)
    stale = [tmp_path / ".last.pt.0123456789abcdef.tmp", tmp_path / ".best.pt.deadbeef.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    run_training(tiny_config(train={"epochs": 2}), tmp_path, resume=True, progress=False)
    assert not any(p.exists() for p in stale)
    assert (tmp_path / "notes.tmp").exists()


# --------------------------------------------------------------------------- metrics.jsonl


@pytest.mark.slow
def test_resume_after_a_torn_metrics_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kill while appending leaves half a JSON line: resuming neither fails nor keeps it."""
    raw = tiny_config(data={"batch_size": 32}, train={"epochs": 1})
    run_training(raw, tmp_path, progress=False)
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as fh:
        fh.write('{"kind": "step", "epoch": 2, "batch": 1, "step": 3, "train_lo')
    assert len(read_metrics(path)) == 3  # the torn line is ignored
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(data={"batch_size": 32}, train={"epochs": 2})))
    code = commands.main(["--config", str(cfg), "--out", str(tmp_path), "--resume"])
    assert code == 0, capsys.readouterr().err
    rows = read_metrics(path)
    assert [r["kind"] for r in rows] == ["step", "step", "epoch", "step", "step", "epoch"]
    assert all(
        line.startswith("{") and line.endswith("}") for line in path.read_text().splitlines()
    )


def test_no_space_while_appending_metrics_is_one_line_and_keeps_the_records(
    tmp_path: Path,
) -> None:
    from phantomdeq.train import OutputWriteError
    from phantomdeq.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False, append=False)
    logger.log("step", {"epoch": 1, "batch": 1, "step": 1, "train_loss": 1.0})
    real = logger._fh

    class Full:
        def write(self, text: str) -> int:
            assert real is not None
            real.write(text[:10])  # part of the line reaches the file
            real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            assert real is not None
            real.close()

    logger._fh = Full()  # type: ignore[assignment]
    with pytest.raises(OutputWriteError) as err:
        logger.log("step", {"epoch": 1, "batch": 2, "step": 2, "train_loss": 0.5})
    path = tmp_path / "metrics.jsonl"
    msg = str(err.value)
    assert f"cannot append to {str(path)!r}: no space left on the device (ENOSPC" in msg
    assert "the records before are kept" in msg and "\n" not in msg
    logger.close()  # nothing left to fail
    assert real is not None and real.closed
    assert [r["step"] for r in read_metrics(path)] == [1]  # the torn line is skipped


def test_damaged_metrics_line_in_the_middle_is_named(tmp_path: Path) -> None:
    from phantomdeq.train.metrics import MetricsFileError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "step": 1}\n{"kind": "st\n{"kind": "step", "step": 2}\n')
    with pytest.raises(MetricsFileError, match=r"metrics\.jsonl' line 2 is not a JSON record"):
        read_metrics(path)


# --------------------------------------------------------------------------- extending a run


@pytest.mark.slow
def test_extending_a_finished_run_replans_the_cosine_schedule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--resume --set train.epochs=3`` on a finished 2-epoch run trains one more epoch; the
    cosine schedule is re-planned over 3 epochs from the current step (stated on stderr): the
    new steps run at the learning rates of a 3-epoch cosine schedule."""
    import yaml

    raw = tiny_config(
        data={"batch_size": 32},
        optim={"name": "sgd", "lr": 0.05, "schedule": "cosine", "min_lr": 0.001},
        train={"epochs": 2},
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert commands.main(["--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert commands.main(["--out", str(run), "--resume", "--set", "train.epochs=3"]) == 0
    captured = capsys.readouterr()
    assert "extending the run" in captured.err and "from 2 to 3 epochs" in captured.err
    assert "re-planned over 3 epochs (6 steps)" in captured.err
    assert json.loads(captured.out)["steps"] == 6
    lrs = [r["lr"] for r in steps(run)]
    plan2 = [0.001 + 0.049 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    plan3 = [0.001 + 0.049 * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in (4, 5)]
    assert lrs == pytest.approx(plan2 + plan3, rel=1e-12)
    # a smaller epoch count than already trained is refused, one line, status 2
    assert commands.main(["--out", str(run), "--resume", "--set", "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.epochs: the run in" in err
    assert "has already trained 3 epoch(s)" in err
