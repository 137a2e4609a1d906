"""Checkpoints: atomic writes, RNG state round trip, clear errors for corrupted files, exact
resume after an interruption, and a non-finite loss stopping training with the last good
checkpoint intact."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from phantomdeq.train import (  # noqa: E402
    Trainer,
    TrainingError,
    commands,
    config_from_dict,
    eval_command,
    run_training,
)
from phantomdeq.train.checkpoint import (  # noqa: E402
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from phantomdeq.train.metrics_log import read_metrics  # noqa: E402


def tiny_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """MDEQ-Tiny on a 64-image digits subset without dropout (sections update the defaults)."""
    raw: dict[str, Any] = {
        "model": {"name": "mdeq_tiny", "dropout": 0.0},
        "data": {"name": "digits", "train_size": 64, "test_size": 64, "batch_size": 64},
        "solver": {"name": "anderson", "max_iter": 6, "tol": 1e-3},
        "grad": {"name": "upg", "k": 2, "lam": 0.5},
        "optim": {"name": "adam", "lr": 3e-3, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"epochs": 3, "seed": 0, "num_threads": 1, "device": "cpu"},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def steps(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]


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
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"PK\x03\x04 broken zip")
    assert eval_command.main(["--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "phantomdeq eval: error: checkpoint" in err and str(bad) in err and "corrupted" in err
    assert eval_command.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 1
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


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_after_interruption_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropout (variational, 0.25), augmentation, SGD momentum and a cosine schedule all in
    play; 3 epochs of 2 steps; the interrupted run stops inside epoch 2 and is resumed."""
    raw = tiny_config(
        model={"dropout": 0.25},
        data={"batch_size": 32, "augment": True, "crop_padding": 1},
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "cosine", "warmup_steps": 1},
        train={"epochs": 3},
    )
    cfg = config_from_dict(raw)
    full = tmp_path / "full"
    run_training(cfg, full, progress=False)

    part = tmp_path / "part"
    original = Trainer._train_step
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:  # second step of epoch 2
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, part, progress=False)
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert load_checkpoint(part / "last.pt")["epoch"] == 1
    # the interruption left a step record of epoch 2 behind; resuming drops it
    result = run_training(cfg, part, resume=True, progress=False)
    assert result["steps"] == 6 and result["epochs"] == 3

    a, b = _params(full / "last.pt"), _params(part / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert [r["step"] for r in steps(part)] == [1, 2, 3, 4, 5, 6]
    assert [r["train_loss"] for r in steps(part)] == pytest.approx(
        [r["train_loss"] for r in steps(full)], abs=1e-6
    )


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    raw = tiny_config(train={"epochs": 1})
    run_training(raw, tmp_path, progress=False)
    changed = tiny_config(train={"epochs": 1}, optim={"lr": 0.01})
    with pytest.raises(ValueError, match=r"config differs from the checkpoint's in optim\.lr"):
        run_training(changed, tmp_path, resume=True, progress=False)


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
