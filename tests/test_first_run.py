"""A lean, guiding first run (issue 24, item 4): ``make demo`` installs only what the demo
needs and still lets ``make test`` install the rest; the demo ends with where its outputs went
and what to run next; ``phantomdeq eval`` takes a run folder and explains its metrics; a
missing extra's message names every missing package of that extra."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from phantomdeq import cli
from phantomdeq._extras import missing_message
from phantomdeq.experiments import demo
from phantomdeq.train import commands, run_training

ROOT = Path(__file__).resolve().parents[1]


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


# ----------------------------------------------------------------------------- Makefile


def _rule(makefile: str, target: str) -> tuple[list[str], list[str]]:
    """(prerequisites, recipe lines) of ``target`` in ``makefile``."""
    m = re.search(rf"^{re.escape(target)}:([^\n]*)\n((?:\t[^\n]*\n)*)", makefile, re.M)
    assert m is not None, target
    return m.group(1).split(), [line.strip() for line in m.group(2).splitlines()]


def test_make_demo_installs_only_what_the_demo_needs() -> None:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    variables = dict(re.findall(r"^(\w+)\s*:=\s*(\S+)", text, re.M))
    demo_stamp, full_stamp = "$(DEMO_STAMP)", "$(STAMP)"
    assert variables["DEMO_STAMP"] != variables["STAMP"]
    prereqs, _ = _rule(text, "demo")
    assert prereqs == [demo_stamp]
    _, recipe = _rule(text, demo_stamp)
    installs = " ".join(line for line in recipe if "pip install" in line)
    assert "torch==" in installs and "'.[train,plots]'" in installs
    for heavy in ("dev", "docs", "tensorboard", "torchdeq"):
        assert heavy not in installs, heavy
    # the full environment builds on the demo's, so `make demo` then `make test` works (and the
    # other order too: the demo stamp is made on the way to the full one)
    prereqs, recipe = _rule(text, full_stamp)
    assert demo_stamp in prereqs
    full = " ".join(recipe)
    assert "dev" in full and "docs" in full and "tensorboard" in full and "torchdeq==" in full
    for target in ("test", "test-all", "docs", "lint", "typecheck", "bench"):
        assert _rule(text, target)[0][:1] == [full_stamp], target


# ----------------------------------------------------------------------------- the demo's end


def test_the_demo_ends_with_its_outputs_and_the_next_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "run_core_demo", lambda: None)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--skip-train", "--skip-synthetic"]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().splitlines()[-1].startswith("  phantomdeq configs")
    run = out / "mdeq_tiny_digits"
    (run).mkdir(parents=True)
    (run / "curves.png").write_bytes(b"")
    ending = demo.next_steps(out, trained=True, synthetic=True)
    assert f"training run: {run}/" in ending
    assert f"its curves: {run / 'curves.png'}" in ending
    assert f"phantomdeq eval {run}" in ending
    assert "--config mdeq_tiny_mnist" in ending and "data.download=true" in ending
    assert "no figure: pip install 'phantomdeq[plots]'" in ending  # no fig1.png written


# ----------------------------------------------------------------------------- eval RUN_DIR


def _tiny_run(path: Path) -> None:
    raw = {
        "model": {"name": "mdeq_tiny", "dropout": 0.0},
        "data": {"name": "digits", "train_size": 64, "test_size": 64, "batch_size": 64},
        "solver": {"name": "anderson", "max_iter": 6, "tol": 1e-3},
        "eval_solver": {"name": "anderson", "max_iter": 7, "tol": 2e-3},
        "grad": {"name": "upg", "k": 2, "lam": 0.5},
        "optim": {"name": "adam", "lr": 3e-3, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"epochs": 1, "seed": 0, "num_threads": 1, "device": "cpu"},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    run_training(raw, path, progress=False)


def test_eval_takes_a_run_folder_and_explains_its_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _tiny_run(run)
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    assert cli.main(["eval", str(run), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(run / "best.pt")
    meaning = report["meaning"]
    assert set(report) - {"checkpoint", "meaning"} <= set(meaning)  # every metric in words
    converged = meaning["test_fwd_converged"]
    assert "||F(z) - z|| / ||z|| <= 0.002" in converged and "within 7 iterations" in converged
    assert f"{100 * report['test_fwd_converged']:.1f} %" in converged
    # without best.pt the folder stands for last.pt (--checkpoint FILE: tests/test_checkpoint.py)
    (run / "best.pt").unlink()
    assert commands.eval_main(["--checkpoint", str(run), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(run / "last.pt")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "give one run folder or checkpoint"),
        (["{empty}", "--checkpoint", "x.pt"], "got both"),
        (["{empty}"], "a folder without best.pt or last.pt"),
        (["{empty}/nope.pt"], "not found"),
    ],
)
def test_eval_without_a_checkpoint_is_one_line(
    argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    assert commands.eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("phantomdeq eval: error: ")
    assert words in err


# ----------------------------------------------------------------------------- missing extras


def test_a_missing_extra_names_every_missing_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    _hide(monkeypatch, "yaml", "pydantic", "tqdm", "PIL")  # sklearn stays installed
    assert cli.main(["train", "--config", "mdeq_tiny_digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "phantomdeq train: error: this command needs pydantic, PyYAML (not installed; also "
        "missing from phantomdeq[train]: tqdm, Pillow): pip install 'phantomdeq[train]'"
    )
    # one missing package: the message is as before
    monkeypatch.undo()
    _hide(monkeypatch, "tqdm")
    assert missing_message(["tqdm"], "it") == "it needs tqdm (not installed): pip install " + (
        "'phantomdeq[train]'"
    )
