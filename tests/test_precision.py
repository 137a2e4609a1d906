"""Mixed precision (train.precision): the config rules, autocast really active in stem, cell and
head while the solver runs in fp32 outside autocast, a bf16 run against fp32, and the fp16
gradient scaler surviving a checkpoint round trip."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import conftest

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

import phantomdeq as pdq  # noqa: E402
import phantomdeq.models.mdeq as mdeq  # noqa: E402
from phantomdeq.models import build_model  # noqa: E402
from phantomdeq.train import (  # noqa: E402
    ConfigError,
    Trainer,
    commands,
    config_from_dict,
    load_checkpoint,
    load_config,
    run_training,
)
from phantomdeq.train.metrics import read_metrics  # noqa: E402
from phantomdeq.train.precision import MixedPrecision, check_precision  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "mdeq_tiny_digits.yaml"


tiny_config = functools.partial(
    conftest.tiny_config,
    {
        "data": {"test_size": 32, "batch_size": 32},
        "solver": {"max_iter": 4},
        "train": {"epochs": 2, "device": "auto", "bn_recalibration_batches": 1},
    },
)


# --------------------------------------------------------------------------- config


def test_precision_option_and_its_combinations() -> None:
    assert config_from_dict(tiny_config()).train.precision == "fp32"
    for p in ("bf16", "fp16"):  # both autocast on CPU in torch 2.13 (fp16 with a CPU GradScaler)
        assert config_from_dict(tiny_config(train={"precision": p})).train.precision == p
    with pytest.raises(ConfigError, match=r"train\.precision: .*fp32.*bf16.*fp16"):
        config_from_dict(tiny_config(train={"precision": "fp8"}))
    with pytest.raises(
        ConfigError, match=r"^train\.precision: bf16 needs train\.dtype float32 \(autocast leaves"
    ):
        config_from_dict(tiny_config(train={"precision": "bf16", "dtype": "float64"}))
    assert check_precision("fp32", "float64") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        MixedPrecision("half", "cpu")


# --------------------------------------------------------------------------- autocast placement


class RecordingAnderson(pdq.Anderson):
    """Anderson that records whether autocast was on when the solver was entered and the dtype
    of the state it was handed."""

    seen: list[tuple[bool, torch.dtype]]

    def __call__(self, f: Any, z0: Any, *args: Any, **kwargs: Any) -> Any:
        state = z0[0] if isinstance(z0, tuple | list) else z0
        self.seen.append((torch.is_autocast_enabled("cpu"), state.dtype))
        return super().__call__(f, z0, *args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_covers_stem_cell_head_but_not_the_solver(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    solver = RecordingAnderson(max_iter=5, tol=1e-3)
    solver.seen = []
    model = build_model(
        "mdeq_tiny", num_classes=10, in_channels=1, solver=solver, grad=pdq.UPG(k=2, lam=0.5)
    )
    convs: dict[str, set[torch.dtype]] = {"stem": set(), "deq": set(), "head": set()}
    cell_calls: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def conv_hook(name: str) -> Any:
        return lambda mod, inp, out: convs[name].add(out.dtype)

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(conv_hook(name.split(".")[0]))
    model.f.register_forward_hook(
        lambda mod, inp, out: cell_calls.append(
            (torch.is_autocast_enabled("cpu"), inp[0][0].dtype, out[0].dtype)
        )
    )
    x = torch.randn(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, generator=torch.Generator().manual_seed(1))
    loss = nn.functional.cross_entropy(out.logits.float(), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    # convolutions of the stem, of F (inside the solve and the phantom-gradient unroll) and of
    # the head ran in the low-precision type
    assert convs == {"stem": {dtype}, "deq": {dtype}, "head": {dtype}}
    assert out.logits.dtype == dtype
    # F ran under autocast on the fp32 state; its raw output is low precision (cast back to the
    # state dtype by the wrapper)
    assert cell_calls and all(c == (True, torch.float32, dtype) for c in cell_calls)
    # the solver itself was entered with autocast off and an fp32 state
    assert solver.seen == [(False, torch.float32)]
    assert out.info is not None and out.info.rel_residual.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in out.state or ())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and bool(g.isfinite().all()) for g in grads)

    # without autocast nothing changes: fp32 everywhere
    for v in convs.values():
        v.clear()
    model(x, generator=torch.Generator().manual_seed(1))
    assert convs == {"stem": {torch.float32}, "deq": {torch.float32}, "head": {torch.float32}}


def test_bf16_model_output_is_close_to_fp32() -> None:
    """Same weights, same input: the bf16 logits agree with fp32 to bf16's resolution (8
    significant bits, ~4e-3 relative), i.e. the low-precision forward computes the same
    function."""
    torch.manual_seed(0)
    model = build_model(
        "mdeq_tiny",
        num_classes=10,
        in_channels=1,
        solver=pdq.Anderson(max_iter=30, tol=1e-4),
        grad=pdq.UPG(k=2, lam=0.5),
    ).eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ref = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).logits.float()
    err = float((low - ref).norm() / ref.norm())
    assert 1e-4 < err < 5e-2, err  # not identical (bf16 really used), but close


# --------------------------------------------------------------------------- training runs


DIGITS_RUN = ["log.progress=false", "log.tensorboard=false", "log.plot=false"]


@pytest.mark.slow
def test_bf16_training_follows_fp32(tmp_path: Path) -> None:
    """The digits recipe (configs/mdeq_tiny_digits.yaml) for one epoch of 16 steps on 256
    images, batch 16, in fp32 and in bf16 from the same initial weights: the first loss (before
    any update: forward precision only) agrees to 0.01, the epoch's mean loss to 0.1 (measured:
    1.946 fp32 vs 1.880 bf16, the trajectories drifting apart slowly), and both runs lower the
    loss (last four steps' mean about 0.75 below the first loss in both; asserted: 0.3). Eight
    steps were too few: single batches of 16 are noisy enough that a correct bf16 run ended
    within 0.001 of an 0.1 decrease."""
    over = [
        *DIGITS_RUN,
        "train.epochs=1",
        "data.train_size=256",
        "data.test_size=64",
        "data.batch_size=16",
        "optim.warmup_steps=2",
        "train.bn_recalibration_batches=1",
    ]
    losses = {}
    for p in ("fp32", "bf16"):
        run_training(
            load_config(DIGITS, [*over, f"train.precision={p}"]), tmp_path / p, progress=False
        )
        rows = [r for r in read_metrics(tmp_path / p / "metrics.jsonl") if r["kind"] == "step"]
        losses[p] = [float(r["train_loss"]) for r in rows]
    a, b = losses["fp32"], losses["bf16"]
    assert len(a) == len(b) == 16
    assert a != b  # bf16 really computed something else
    assert abs(a[0] - b[0]) < 0.01, (a, b)
    assert abs(sum(a) / 16 - sum(b) / 16) < 0.1, (a, b)
    for run in (a, b):
        assert sum(run[-4:]) / 4 < run[0] - 0.3, run


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PHANTOMDEQ_FULL_PRECISION_TEST") != "1",
    reason="25 min of bf16 on CPUs without AVX512-BF16; set PHANTOMDEQ_FULL_PRECISION_TEST=1 "
    "(benchmarks/gpu_check.py, part digits_bf16, checks the same criterion on a GPU)",
)
def test_bf16_digits_two_epochs_within_two_points_of_fp32(tmp_path: Path) -> None:
    """The full digits recipe, 2 epochs (train.device auto: the GPU when there is one). Measured
    once on the project's 2-core CPU: 95.54 % in fp32; 97.49 % for bf16 training (that run was
    evaluated in fp32, before evaluation followed train.precision)."""
    acc = {}
    for p in ("fp32", "bf16"):
        cfg = load_config(DIGITS, [*DIGITS_RUN, "train.epochs=2", f"train.precision={p}"])
        acc[p] = run_training(cfg, tmp_path / p, progress=False)["test_acc"]
    assert acc["fp32"] > 0.9, acc
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.02, acc


@pytest.mark.slow
def test_bf16_checkpoint_keeps_precision_and_eval_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tiny_config(train={"precision": "bf16", "epochs": 1})
    run_training(raw, tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["config"]["train"]["precision"] == "bf16"
    assert "grad_scaler" not in state.get("extra", {})  # no loss scaling in bf16
    # a resumed run must keep the precision it was trained with
    with pytest.raises(ConfigError, match=r"train\.precision"):
        run_training(tiny_config(train={"precision": "fp32", "epochs": 1}), tmp_path, resume=True)
    # phantomdeq eval evaluates in the stored precision (autocast on around the model)
    seen: list[bool] = []
    forward = mdeq.MDEQ.forward

    def recording(self: Any, x: torch.Tensor, **kw: Any) -> Any:
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, x, **kw)

    monkeypatch.setattr(mdeq.MDEQ, "forward", recording)
    assert commands.eval_main(["--checkpoint", str(tmp_path / "last.pt"), "--device", "cpu"]) == 0
    assert seen and all(seen)
    assert '"test_acc"' in capsys.readouterr().out


@pytest.mark.slow
def test_fp16_scaler_state_survives_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 with dynamic loss scaling: the scale found in epoch 1 (2^16 overflows at first, so
    steps are skipped and the scale halves) is checkpointed and restored, so an interrupted and
    resumed run makes the same updates -- including the same skipped steps -- as an
    uninterrupted one."""
    cfg = config_from_dict(tiny_config(train={"precision": "fp16", "epochs": 2}))
    full = tmp_path / "full"
    run_training(cfg, full, progress=False)
    rows = [r for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    scales = [r["grad_scale"] for r in rows]
    assert all(math.isfinite(s) and s > 0 for s in scales)
    assert scales[1] < 2.0**16, scales  # the scaler did act (otherwise this tests nothing)
    epoch_rows = [r for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "epoch"]
    assert sum(r["scaler_skipped_steps"] for r in epoch_rows) == sum(
        r["scaler_skipped"] for r in rows
    )

    part = tmp_path / "part"
    original = Trainer._train_step
    calls = {"n": 0}

    def interrupted(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # first step of epoch 2
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, part, progress=False)
    monkeypatch.setattr(Trainer, "_train_step", original)
    saved = load_checkpoint(part / "last.pt")["extra"]["grad_scaler"]
    assert saved["scale"] == scales[1]  # the scale after epoch 1's last step
    run_training(cfg, part, resume=True, progress=False)
    resumed = [r for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["grad_scale"] for r in resumed] == scales
    a = load_checkpoint(full / "last.pt")["model"]
    b = load_checkpoint(part / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
