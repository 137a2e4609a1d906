"""The package as a user installing it meets it: commands without their optional
dependencies, the configs shipped as package data and usable by name, ``--help`` defaults, and
a training run that says which outputs it cannot write."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phantomdeq.train.metrics as metrics_log
from phantomdeq import cli, presets
from phantomdeq.experiments.measure import cpu_peak_memory
from phantomdeq.train import ConfigError, load_config, run_training

ROOT = Path(__file__).resolve().parents[1]


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import module`` fail as when it is not installed (``find_spec`` finds nothing)."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


# ----------------------------------------------------------------------------- missing extras


@pytest.mark.parametrize(
    ("argv", "hidden"),
    [
        (["train", "--config", "mdeq_tiny_digits"], "yaml"),
        (["train", "--config", "mdeq_tiny_digits"], "pydantic"),
        (["eval", "--checkpoint", "x.pt"], "yaml"),
        (["ablate", "--out", "x"], "yaml"),
        (["synthetic", "--out", "x", "--no-progress"], "pydantic"),
        (["cost", "--out", "x"], "pydantic"),
        (["demo"], "sklearn"),
    ],
)
def test_a_command_without_its_extra_names_it_in_one_line(
    argv: list[str],
    hidden: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    _hide(monkeypatch, hidden)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"phantomdeq {argv[0]}: error: this command needs ")
    assert err.endswith("pip install 'phantomdeq[train]'")
    assert not list(tmp_path.iterdir())  # nothing started


def test_an_optional_module_met_while_running_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def needs_pillow(argv: list[str]) -> int:
        import PIL  # noqa: F401 - what an image-folder run imports

        return 0

    monkeypatch.setattr("phantomdeq.presets.main", needs_pillow)
    _hide(monkeypatch, "PIL")
    assert cli.main(["configs"]) == 2
    assert capsys.readouterr().err.strip() == (
        "phantomdeq configs: error: this command needs Pillow (not installed): "
        "pip install 'phantomdeq[train]'"
    )


@pytest.mark.slow
def test_commands_run_without_tqdm_matplotlib_tensorboard(tmp_path: Path) -> None:
    """A fresh interpreter in which tqdm, matplotlib, TensorBoard, Pillow and TorchDEQ cannot be
    imported: every ``--help`` works, and ``synthetic`` runs (with and without progress)."""
    script = f"""
import sys
for name in ("tqdm", "matplotlib", "tensorboard", "PIL", "torchdeq"):
    sys.modules[name] = None  # what `import` and find_spec meet when it is not installed
import contextlib, io
from phantomdeq import cli
for name in cli.COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        cli.main([name, "--help"])
    assert "usage: phantomdeq " + name in out.getvalue(), name
small = ["--draws", "3", "--ks", "1,2", "--lams", "1", "--no-figure", "--no-theorem"]
assert cli.main(["synthetic", "--out", {str(tmp_path / "a")!r}, "--no-progress", *small]) == 0
assert cli.main(["synthetic", "--out", {str(tmp_path / "b")!r}, *small]) == 0
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "no progress bar" in line]
    assert notes == [  # Pillow, hidden too, is of the same extra: named as well (issue 24)
        "phantomdeq: no progress bar: it needs tqdm (not installed; also missing from "
        "phantomdeq[train]: Pillow): pip install 'phantomdeq[train]'"
    ]
    assert (tmp_path / "a" / "summary.json").is_file()


# ----------------------------------------------------------------------------- shipped configs


def test_every_config_is_package_data() -> None:
    """The wheel takes ``phantomdeq/configs/**`` (a link to the repository's ``configs/``) by
    the package-data patterns of pyproject.toml: every YAML file there must match one."""
    link = ROOT / "src" / "phantomdeq" / "configs"
    assert link.resolve() == (ROOT / "configs").resolve()
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    line = re.search(r"^phantomdeq = \[(.*)\]$", section, re.M)
    assert line is not None, "no package-data for phantomdeq in pyproject.toml"
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    files = [p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")]
    assert files
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) for pat in patterns), f"{f} is not in the wheel"
    assert sorted(presets.preset_names()) == sorted(f[len("configs/") : -5] for f in files)


def test_a_preset_name_is_a_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository: the name is found in the package
    by_name = load_config("mdeq_tiny_digits")
    by_path = load_config(ROOT / "configs" / "mdeq_tiny_digits.yaml")
    assert by_name == by_path
    # the preset's data.root (the shared MNIST folder) need not exist on this machine
    data = tmp_path / "mnist"
    data.mkdir()
    assert load_config("ablation/mnist_upg.yaml", [f"data.root={data}"]).grad.name == "upg"
    with pytest.raises(
        ConfigError, match=r"config 'mdeq_tiny_digit': no such file and no preset.*mdeq_tiny_digits"
    ):
        load_config("mdeq_tiny_digit")


def test_configs_command_lists_and_prints(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["configs"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == presets.preset_names()
    assert any(line.startswith("mdeq_tiny_digits ") and "digits" in line for line in listing)
    assert cli.main(["configs", "mdeq_tiny_digits"]) == 0
    assert capsys.readouterr().out == (ROOT / "configs" / "mdeq_tiny_digits.yaml").read_text()
    assert cli.main(["configs", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("phantomdeq configs: error: config 'nope': no such file")


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("synthetic", "(default: 200)"),
        ("synthetic", "(default: 1,2,3,4,5,6,7,8,9,10)"),
        ("cost", "(default: mdeq_tiny)"),
        ("ablate", "(default: 1)"),
        ("eval", "(default: auto)"),
        ("demo", "(default: runs/demo)"),
    ],
)
def test_help_shows_defaults(command: str, shown: str, capsys: pytest.CaptureFixture) -> None:
    with contextlib.suppress(SystemExit):  # argparse exits after --help (synthetic returns 0)
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert shown in out
    assert "(default: None)" not in out and "(default: False)" not in out


# ----------------------------------------------------------------------------- training notes


@pytest.mark.slow
def test_training_says_once_which_outputs_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(metrics_log, "_make_writer", lambda log_dir: None)
    monkeypatch.setattr(
        metrics_log, "is_available", lambda m: m not in ("tensorboard", "matplotlib")
    )
    _hide(monkeypatch, "matplotlib", "matplotlib.pyplot")
    cfg = load_config(
        "mdeq_tiny_digits",
        [
            "data.train_size=64",
            "data.test_size=32",
            "data.batch_size=32",
            "train.epochs=2",
            "train.bn_recalibration_batches=0",
            "log.progress=false",
        ],
    )
    run_training(cfg, tmp_path / "run", progress=False)
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "tensorboard" in line] == [
        "phantomdeq: no tensorboard/ logs: it needs tensorboard (not installed): "
        "pip install 'phantomdeq[tensorboard]' (or set log.tensorboard: false)"
    ]
    assert [line for line in err if "curves.png" in line] == [
        "phantomdeq: no curves.png: it needs matplotlib (not installed): "
        "pip install 'phantomdeq[plots]' (or set log.plot: false)"
    ]
    assert not (tmp_path / "run" / "curves.png").exists()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "epoch"


# ----------------------------------------------------------------------------- cost's stderr


def test_cpu_memory_profiling_keeps_the_profilers_log_lines_off_stderr(
    capfd: pytest.CaptureFixture,
) -> None:
    before = [torch.ones(1024) for _ in range(2)]  # freed while profiling: c10 warns

    def step() -> None:
        os.write(2, b"a message of the measured code\n")
        before.pop()
        torch.ones(4096).sum()

    for _ in range(2):  # libkineto logs at every profiler start and stop
        assert cpu_peak_memory(step).peak_bytes >= 4096 * 4
    err = capfd.readouterr().err
    assert err.count("a message of the measured code") == 2
    assert "USDT" not in err and "profiler_start" not in err and "STAGE" not in err
    assert "Memory block of unknown size" not in err
