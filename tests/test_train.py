"""Training loop on the digits data set: every estimator lowers the loss, the pretraining stage,
Jacobian regularisation, the files a run writes, the CLI and the learning-rate schedule."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import conftest
from conftest import steps

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from phantomdeq.train import (  # noqa: E402
    LRSchedule,
    commands,
    config_from_dict,
    load_config,
    run_training,
)
from phantomdeq.train.metrics import read_metrics  # noqa: E402

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


tiny_config = functools.partial(conftest.tiny_config, {"train": {"epochs": 3, "device": "auto"}})


@pytest.mark.slow
@pytest.mark.filterwarnings(
    "ignore:IFT backward solve did not reach:RuntimeWarning"
)  # loose IFT budget: intended
@pytest.mark.parametrize("grad", ["ift", "upg", "npg", "onestep"])
def test_training_steps_lower_the_loss(tmp_path: Path, grad: str) -> None:
    """Full-batch steps on the same 64 images: the loss recorded before the 3rd update is below
    the loss before the 1st (each record is the loss of the batch before that step's update)."""
    raw = tiny_config(grad={"name": grad}, train={"epochs": 3})
    if grad == "ift":
        raw["grad"]["backward_solver"] = {"name": "fixed_point", "max_iter": 8, "tol": 1e-5}
    result = run_training(raw, tmp_path, progress=False)
    losses = [r["train_loss"] for r in steps(tmp_path)]
    assert len(losses) == 3 and result["steps"] == 3
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    assert 0.0 <= result["test_acc"] <= 1.0
    assert 1.0 <= result["fwd_nstep"] <= 6.0


@pytest.mark.slow
def test_pretraining_stage_then_deq_and_jacobian_regulariser(tmp_path: Path) -> None:
    raw = tiny_config(
        data={"batch_size": 32},
        train={
            "epochs": 2,
            "pretrain_steps": 2,
            "unrolled_steps": 3,
            "jac_reg_weight": 0.5,
            "jac_reg_every": 2,
        },
    )
    run_training(raw, tmp_path, progress=False)
    recs = steps(tmp_path)
    assert [r["stage"] for r in recs] == ["unrolled", "unrolled", "deq", "deq"]
    # unrolled pretraining has no solver: no forward statistics
    assert recs[0]["fwd_nstep"] is None and recs[2]["fwd_nstep"] >= 1
    # regulariser on DEQ steps whose 0-based index is a multiple of 2: step index 2 only
    assert "jac_loss" not in recs[0] and "jac_loss" not in recs[1] and "jac_loss" not in recs[3]
    assert recs[2]["jac_loss"] > 0.0


@pytest.mark.slow
def test_run_writes_metrics_config_checkpoints_and_curves(tmp_path: Path) -> None:
    raw = tiny_config(
        data={"batch_size": 32},
        train={"epochs": 2},
        log={"plot": True, "tensorboard": True, "every": 1},
    )
    result = run_training(raw, tmp_path, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    kinds = [r["kind"] for r in rows]
    assert kinds == ["step", "step", "epoch", "step", "step", "epoch"]
    for r in rows:
        for key in ("epoch", "step", "train_loss", "time_s", "fwd_nstep", "fwd_residual"):
            assert key in r, (key, r)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [e["step"] for e in epochs] == [2, 4] and [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert 0.0 <= e["test_acc"] <= 1.0 and e["test_fwd_nstep"] >= 1
        assert 0.0 <= e["test_fwd_converged"] <= 1.0 and e["test_fwd_residual"] >= 0.0
    assert result["test_acc"] == epochs[-1]["test_acc"]
    assert result["best_test_acc"] == max(e["test_acc"] for e in epochs)
    # the saved config is the resolved one and loads back to the same run
    assert load_config(tmp_path / "config.yaml") == config_from_dict(raw)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    assert not list(tmp_path.glob(".*.tmp"))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = tmp_path / "c.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(tiny_config(train={"epochs": 1})))
    run = tmp_path / "run"
    code = commands.main(
        [
            "--config",
            str(cfg_path),
            "--out",
            str(run),
            "--set",
            "grad.name=onestep",
            "--no-progress",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 1 and load_config(run / "config.yaml").grad.name == "onestep"
    assert commands.eval_main(["--checkpoint", str(run / "last.pt"), "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["epoch"] == 1 and ev["step"] == 1
    assert ev["test_acc"] == pytest.approx(out["test_acc"], abs=1e-12)
    assert ev["test_fwd_nstep"] == pytest.approx(out["test_fwd_nstep"])


def test_lr_schedule_warmup_then_cosine() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    s = LRSchedule(opt, base_lr=0.1, total_steps=110, warmup_steps=10, min_lr=0.001)
    assert s.lr_at(0) == pytest.approx(0.01) and s.lr_at(9) == pytest.approx(0.1)
    assert s.lr_at(10) == pytest.approx(0.1)
    assert s.lr_at(60) == pytest.approx(0.001 + (0.1 - 0.001) / 2)  # half-way: cos = 0
    assert s.lr_at(110) == pytest.approx(0.001)
    s.set_step(60)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0505)
    const = LRSchedule(opt, base_lr=0.1, total_steps=10, kind="constant")
    assert const.lr_at(7) == 0.1


@pytest.mark.slow
def test_optimizer_options_reach_torch(tmp_path: Path) -> None:
    """SGD with momentum / weight decay and gradient clipping: the checkpointed optimiser state
    carries the configured hyper-parameters and a momentum buffer."""
    raw = tiny_config(
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "grad_clip": 1.0},
        train={"epochs": 1},
    )
    run_training(raw, tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    assert any("momentum_buffer" in v for v in state["optimizer"]["state"].values())


@pytest.mark.slow
@pytest.mark.skipif(not MNIST.is_dir(), reason="shared MNIST t10k folder not present")
def test_mnist_config_trains_one_step(tmp_path: Path) -> None:
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "mdeq_tiny_mnist.yaml",
        [
            "data.train_size=32",
            "data.test_size=32",
            "data.batch_size=32",
            "train.epochs=1",
            "solver.max_iter=4",
            "eval_solver.max_iter=4",
            "log.progress=false",
            "log.tensorboard=false",
            "log.plot=false",
        ],
    )
    result = run_training(cfg, tmp_path, progress=False)
    assert result["steps"] == 1 and math.isfinite(result["test_loss"])


@pytest.mark.slow
def test_logged_grad_norm_is_the_norm_of_an_sgd_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``grad_norm`` in metrics.jsonl is the global gradient norm before clipping: with plain
    SGD at lr 1 (no momentum, decay or clipping) it is the norm of the parameter change."""
    from phantomdeq.train.trainer import Trainer

    changes: list[float] = []
    original = Trainer._update

    def spy(self: Trainer, *args: Any) -> dict[str, Any]:
        params = [p for p in self.net.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        rec = original(self, *args)
        sq = sum(float(((p.detach() - b).double() ** 2).sum()) for p, b in zip(params, before))
        changes.append(math.sqrt(sq))
        return rec

    monkeypatch.setattr(Trainer, "_update", spy)
    raw = tiny_config(
        data={"batch_size": 32},
        optim={"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": 0.0},
        train={"epochs": 1},
    )
    run_training(raw, tmp_path, progress=False)
    logged = [r["grad_norm"] for r in steps(tmp_path)]
    assert len(logged) == 2 == len(changes)
    for norm, change in zip(logged, changes):
        assert norm > 0 and norm == pytest.approx(change, rel=1e-5)
