"""Any model, any task: ``model.target`` builds a user's module (a DEQ or an explicit model)
that trains, checkpoints, resumes and evaluates; its errors are one line naming the key; the
MDEQ sizes are presets of it; the ``task`` section and its registry; AdamW's weight-decay
groups; configs and checkpoints written before these keys still load."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from phantomdeq.train import (  # noqa: E402
    ConfigError,
    commands,
    config_from_dict,
    load_checkpoint,
    run_training,
    save_checkpoint,
    weight_decay_groups,
)
from phantomdeq.train.config import config_differences, config_to_dict  # noqa: E402
from phantomdeq.train.metrics import read_metrics  # noqa: E402
from phantomdeq.train.run_folder import saved_best  # noqa: E402
from phantomdeq.train.tasks import TASKS, build_task, task_class  # noqa: E402


def custom_config(target: str = "custom_models:tiny_deq", **sections: dict[str, Any]) -> dict:
    """A custom model on 64 digits in batches of 32 (2 steps per epoch)."""
    raw: dict[str, Any] = {
        "model": {"target": target, "kwargs": {"width": 8} if "tiny_deq" in target else {}},
        "data": {"name": "digits", "train_size": 64, "test_size": 64, "batch_size": 32},
        "solver": {"name": "anderson", "max_iter": 6, "tol": 1e-3},
        "grad": {"name": "upg", "k": 2, "lam": 0.5},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.05, "schedule": "constant"},
        "train": {"epochs": 1, "seed": 0, "num_threads": 1},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = commands.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- happy paths


def test_custom_deq_trains_checkpoints_resumes_and_evaluates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's DEQ module returning ``(logits, info)``: the solver statistics are logged, a
    run interrupted after epoch 1 and resumed matches the uninterrupted one bit for bit, and
    ``phantomdeq eval`` rebuilds the model from the checkpoint's config."""
    full = run_training(custom_config(train={"epochs": 2}), tmp_path / "full", progress=False)
    run_training(custom_config(), tmp_path / "part", progress=False)
    cfg = custom_config(train={"epochs": 2})
    part = run_training(cfg, tmp_path / "part", resume=True, progress=False)
    assert part["steps"] == full["steps"] == 4
    for key in ("test_acc", "best_test_acc", "test_loss", "fwd_nstep"):
        assert part[key] == full[key]
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["kind"] == "step"]
    assert all(1 <= r["fwd_nstep"] <= 6 and math.isfinite(r["train_loss"]) for r in steps)
    assert math.isfinite(full["test_fwd_residual"])

    capsys.readouterr()
    rc = commands.eval_main(["--checkpoint", str(tmp_path / "part" / "best.pt")])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["test_acc"] == part["best_test_acc"]


def test_explicit_model_without_deq_info_trains(tmp_path: Path) -> None:
    """A model returning a plain tensor: no solver statistics (NaN in the result, null in
    metrics.jsonl), everything else as usual."""
    result = run_training(custom_config("custom_models:explicit"), tmp_path, progress=False)
    assert result["steps"] == 2 and 0.0 <= result["test_acc"] <= 1.0
    assert math.isnan(result["test_fwd_nstep"]) and math.isfinite(result["test_loss"])
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert all(r["fwd_nstep"] is None for r in steps)
    assert (tmp_path / "best.pt").is_file()


def test_generator_reaches_forward_that_declares_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer passes only the forward options a model declares: TinyDEQ takes
    ``generator`` (seeded per step), not ``mode``/``jac_reg``/``z0``."""
    import custom_models
    from phantomdeq.train.build import ModelCall

    cfg = config_from_dict(custom_config())
    from phantomdeq.train.build import build_model

    model = build_model(cfg, 10, 1)
    call = ModelCall(model)
    assert call.accepts == {"generator"}
    gen = torch.Generator().manual_seed(0)
    out = call(model, torch.randn(2, 1, 8, 8), mode="deq", jac_reg=False, generator=gen, z0=None)
    assert out.prediction.shape == (2, 10) and out.info is not None
    assert isinstance(model, custom_models.TinyDEQ) and model.generators == [gen]


def test_mdeq_sizes_are_presets_of_the_target() -> None:
    """``model.name`` + ``dropout`` + ``overrides`` builds the same model (same parameters
    from the same seed) as ``model.target: phantomdeq.models:build_mdeq`` with kwargs."""
    from phantomdeq.train.build import build_model

    preset = config_from_dict(
        {"model": {"name": "mdeq_tiny", "dropout": 0.0, "overrides": {"final_channels": 32}}}
    )
    target = config_from_dict(
        {
            "model": {
                "target": "phantomdeq.models:build_mdeq",
                "kwargs": {"size": "mdeq_tiny", "dropout": 0.0, "final_channels": 32},
            }
        }
    )
    assert target.model.name is None
    assert preset.model.resolved() == target.model.resolved()
    torch.manual_seed(0)
    a = build_model(preset, 10, 1).state_dict()
    torch.manual_seed(0)
    b = build_model(target, 10, 1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        ({"target": "custom_models"}, r"^model\.target: expected 'package\.module:factory'"),
        ({"target": "no_such_module_xyz:build"}, r"^model\.target: cannot import module"),
        ({"target": "custom_models:missing"}, r"^model\.target: 'custom_models' has no attr"),
        ({"target": "custom_models:NOT_CALLABLE"}, r"^model\.target: .* is not callable"),
        (
            {"target": "custom_models:tiny_deq", "kwargs": {"widht": 8}},
            r"^model\.kwargs\.widht: not a parameter of model\.target .*; its parameters: ",
        ),
        (
            {"target": "custom_models:tiny_deq", "kwargs": {"solver": "anderson"}},
            r"^model\.kwargs\.solver: is built by the trainer from the solver section",
        ),
        (
            {"name": "mdeq_tiny", "target": "custom_models:tiny_deq"},
            r"^model\.name: give model\.name \(a preset\) or model\.target, not both",
        ),
        ({"target": "custom_models:tiny_deq", "dropout": 0.1}, r"^model\.dropout: applies to"),
        ({"name": "mdeq_huge"}, r"^model\.name: unknown preset 'mdeq_huge'; allowed: mdeq_tiny"),
        ({"name": None}, r"^model\.name: give a preset"),
        ({"name": "mdeq_tiny", "kwargs": {"a": 1}}, r"^model\.kwargs: applies to model\.target"),
        ({"factory": "x:y"}, r"^model\.factory: unknown key; allowed keys in model: name, tar"),
    ],
)
def test_config_errors_name_the_key(model: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        config_from_dict({"model": model})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("target", "train", "pattern"),
    [
        ("custom_models:not_a_module", {}, r"model\.target: .* returned a dict, not a torch"),
        ("custom_models:needs_depth", {}, r"model\.target: cannot call .*needs_depth"),
        ("custom_models:returns_a_string", {}, r"model\.target: the model's forward returned"),
        (
            "custom_models:explicit",
            {"pretrain_steps": 1, "unrolled_steps": 1},
            r"train\.pretrain_steps: unrolled pre-training needs the model's forward to take",
        ),
        (
            "custom_models:explicit",
            {"monitor_every": 1},
            r"train\.monitor_every: needs a phantomdeq\.DEQ inside the model",
        ),
        (
            "custom_models:tiny_deq",
            {"jac_reg_weight": 0.1},
            r"train\.jac_reg_weight: the regulariser needs the model's forward to take jac_reg",
        ),
    ],
)
def test_cli_model_errors_are_one_line_with_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    target: str,
    train: dict[str, Any],
    pattern: str,
) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(custom_config(target, train=train)))
    rc, _, err = cli(["--config", str(path), "--out", str(tmp_path / "run")], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    if "forward returned" not in pattern:  # found in the first step, not at the start
        assert not (tmp_path / "run").exists()  # a failed start leaves no run folder


# --------------------------------------------------------------------------- tasks


def test_task_registry_and_section() -> None:
    assert "image_classification" in TASKS
    assert config_from_dict({}).task.name == "image_classification"
    cls = task_class("image_classification")
    assert cls.metric_names[0] == "loss" and cls.primary == "acc" and cls.higher_is_better
    with pytest.raises(ValueError, match="task.name: unknown task 'nope'; allowed: image_"):
        task_class("nope")
    with pytest.raises(ConfigError, match=r"^task\.name: unknown task 'nope'; allowed: image"):
        config_from_dict({"task": {"name": "nope"}})
    with pytest.raises(ConfigError, match=r"^task\.loss: unknown key"):
        config_from_dict({"task": {"loss": "mse"}})
    task = build_task(config_from_dict({"train": {"label_smoothing": 0.1}}), None)
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1])
    sums = task.metrics(logits, y)
    assert sums["acc"] == 2.0
    expected = float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    assert sums["loss"] == pytest.approx(expected)
    assert task.better(0.5, None) and task.better(0.6, 0.5) and not task.better(math.nan, 0.1)


def test_a_new_task_is_a_module_and_a_registry_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task the loop does not know (tests/custom_models.py: ErrorRate, lower is better, a
    throughput field) registered with one line trains through the unchanged loop: its metrics
    are logged as train_*/test_*, it picks best.pt and names the result's best field."""
    monkeypatch.setitem(TASKS, "error_rate", "custom_models:ErrorRate")
    raw = custom_config("custom_models:explicit", task={"name": "error_rate"})
    raw["train"]["epochs"] = 2
    result = run_training(raw, tmp_path, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert all(r["images_per_s"] > 0 and 0 <= r["train_err"] <= 1 for r in steps)
    assert "train_acc" not in steps[0] and "test_acc" not in epochs[0]
    assert result["best_test_err"] == min(e["test_err"] for e in epochs)
    assert load_checkpoint(tmp_path / "best.pt")["best_metric"] == result["best_test_err"]


# --------------------------------------------------------------------------- AdamW


def _group_names(model: nn.Module, weight_decay: float) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = weight_decay_groups(model, weight_decay)
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    keep = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    return decay, keep


def test_adamw_groups_on_a_custom_module() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.lin = nn.Linear(4, 4)
            self.ln = nn.LayerNorm(4)
            self.gn = nn.GroupNorm(2, 4)
            self.scale = nn.Parameter(torch.ones(4))  # a free 1-d parameter
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)
            self.tied = nn.Linear(4, 5, bias=False)
            self.tied.weight = self.emb.weight  # shared: listed once

    decay, keep = _group_names(Net(), 0.1)
    assert decay == {"emb.weight", "conv.weight", "lin.weight"}
    assert keep == {
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "lin.bias",
        "ln.weight",
        "ln.bias",
        "gn.weight",
        "gn.bias",
        "scale",
    }


def test_adamw_groups_on_an_mdeq_and_in_a_run(tmp_path: Path) -> None:
    from phantomdeq.train.build import build_model, make_optimizer

    cfg = config_from_dict({"optim": {"name": "adamw", "weight_decay": 0.05}})
    model = build_model(cfg, 10, 1)
    decay, keep = _group_names(model, 0.05)
    params = dict(model.named_parameters())
    assert decay | keep == set(params) and not decay & keep
    norms = {
        f"{m}.{n}" if m else n
        for m, mod in model.named_modules()
        if isinstance(mod, nn.GroupNorm | nn.BatchNorm2d)
        for n, _ in mod.named_parameters(recurse=False)
    }
    assert norms and norms <= keep
    assert all(params[n].dim() >= 2 for n in decay)
    assert all(params[n].dim() < 2 or n.endswith("bias") for n in keep)
    assert any("conv" in n or "weight" in n for n in decay)
    opt = make_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]

    raw = custom_config("custom_models:explicit")
    run_training(raw, tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "last.pt")["optimizer"]
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.05, 0.0]


# --------------------------------------------------------------------------- compatibility


def test_configs_and_checkpoints_from_before_target_and_task_still_load(tmp_path: Path) -> None:
    """A checkpoint whose config has no model.target / model.kwargs / task and which stores
    ``best_acc`` only (as written before) resumes; its config equals today's parse."""
    raw = {
        "model": {"name": "mdeq_tiny", "dropout": 0.0},
        "data": {"name": "digits", "train_size": 64, "test_size": 64, "batch_size": 64},
        "solver": {"name": "anderson", "max_iter": 4, "tol": 1e-3},
        "grad": {"name": "upg", "k": 1, "lam": 0.5},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 1, "num_threads": 1},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    first = run_training(raw, tmp_path, progress=False)
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / name)
        old_config = config_to_dict(config_from_dict(state["config"]))
        for key in ("target", "kwargs"):
            del old_config["model"][key]
        del old_config["task"]
        state["config"] = old_config
        del state["best_metric"]
        assert state["best_acc"] == first["best_test_acc"]
        save_checkpoint(tmp_path / name, state)
    old = config_from_dict(load_checkpoint(tmp_path / "last.pt")["config"])
    assert config_differences(old, config_from_dict(raw)) == []
    assert saved_best({"best_acc": -1.0}) is None and saved_best({"best_acc": 0.25}) == 0.25
    raw["train"]["epochs"] = 2
    result = run_training(raw, tmp_path, resume=True, progress=False)
    assert result["epochs"] == 2 and result["best_test_acc"] >= first["best_test_acc"]


@pytest.mark.filterwarnings("ignore:IFT backward solve did not reach:RuntimeWarning")
def test_gradient_monitor_on_a_custom_deq(tmp_path: Path) -> None:
    """``train.monitor_every`` finds the DEQ inside a user's model and compares its gradient
    with the exact one on the task's loss."""
    raw = custom_config(train={"monitor_every": 1})
    run_training(raw, tmp_path, progress=False)
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == 2 and all(-1.0 <= r["monitor_cos"] <= 1.0 for r in steps)
