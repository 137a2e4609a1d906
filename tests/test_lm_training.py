"""Language modelling through the trainer: the ``language_modelling`` task, ``data.name: text``
windows, the vocabulary saved with a run, ``phantomdeq sample`` and ``phantomdeq eval``.

The models themselves (causality, estimator gradients against the dense exact gradient,
per-sequence convergence and non-finite isolation) are tested in ``test_deq_lm.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from phantomdeq.data import BatchLoader, DataError, TextWindows, load_text_dataset
from phantomdeq.train import run_training
from phantomdeq.train.commands import eval_main
from phantomdeq.train.commands import main as train_main
from phantomdeq.train.config import ConfigError, config_from_dict
from phantomdeq.train.data import forward_stats
from phantomdeq.train.sample import main as sample_main
from phantomdeq.train.tasks.language_modelling import LanguageModelling

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
]


def corpus_text(n_lines: int = 60) -> str:
    """A deterministic text of ``n_lines`` lines (lower-case letters, space, newline, ':')."""
    lines = []
    for i in range(n_lines):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 5)]
        lines.append(("speaker: " if i % 4 == 0 else "") + " ".join(words))
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


def lm_config(path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny DEQ language model on ``path``: width 16, 2 heads, context 16, 4 steps an epoch."""
    raw: dict[str, Any] = {
        "model": {
            "target": "phantomdeq.models.deq_lm:DEQTransformerLM",
            "kwargs": {"width": 16, "heads": 2, "mlp_ratio": 2},
        },
        "task": {"name": "language_modelling"},
        "data": {
            "name": "text",
            "path": str(path),
            "context": 16,
            "train_size": 32,
            "test_size": 8,
            "batch_size": 8,
            "eval_batch_size": 8,
        },
        "solver": {"name": "anderson", "max_iter": 8, "tol": 1e-3},
        "grad": {"name": "upg", "k": 2, "lam": 0.5},
        "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant"},
        "train": {"epochs": 2, "seed": 0, "num_threads": 1, "device": "cpu"},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def records(run: Path, kind: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


# --- data ----------------------------------------------------------------------------------------


def test_random_windows_are_shifted_pairs_fixed_per_epoch_and_new_each_epoch() -> None:
    data = torch.arange(1000) % 97
    ds = TextWindows(data, context=10, size=50, random=True)
    idx = torch.arange(50)
    x0, y0 = ds.batch(idx, epoch=0, seed=3)
    assert x0.shape == y0.shape == (50, 10) and x0.dtype == torch.long
    starts = ds.starts(0, 3)
    for i in range(50):  # x is the window, y the same window one token on
        s = int(starts[i])
        assert torch.equal(x0[i], data[s : s + 10]) and torch.equal(y0[i], data[s + 1 : s + 11])
    again, _ = TextWindows(data, context=10, size=50, random=True).batch(idx, epoch=0, seed=3)
    assert torch.equal(again, x0)  # a fresh object (a resumed run) draws the same windows
    x1, _ = ds.batch(idx, epoch=1, seed=3)
    xs, _ = ds.batch(idx, epoch=0, seed=4)
    assert not torch.equal(x1, x0) and not torch.equal(xs, x0)
    part, _ = ds.batch(torch.tensor([7, 2]), epoch=0, seed=3)
    assert torch.equal(part, x0[[7, 2]])  # a window depends on its index, not on its batch


def test_evaluation_windows_are_non_overlapping_and_evenly_spread() -> None:
    data = torch.arange(1001)
    full = TextWindows(data, context=10)  # all 100 blocks
    assert len(full) == 100
    x, y = full.batch(torch.arange(100))
    assert torch.equal(x.reshape(-1), data[:1000]) and torch.equal(y.reshape(-1), data[1:1001])
    some = TextWindows(data, context=10, size=4)
    assert some.starts().tolist() == [0, 250, 500, 750]
    with pytest.raises(DataError, match="101 requested.*100 non-overlapping"):
        TextWindows(data, context=10, size=101)


def test_load_text_dataset_splits_and_describes(corpus: Path) -> None:
    train, val, info = load_text_dataset(corpus, context=16, train_size=40, test_size=5)
    text = corpus.read_text()
    assert info.vocab_size == len(set(text)) and info.context == 16
    assert info.num_chars == len(text)
    assert len(train) == 40 and len(val) == 5
    n_train = int(len(text) * 0.9)
    assert train.data.numel() == n_train and val.data.numel() == len(text) - n_train
    assert info.vocab.decode(val.data[:20]) == text[n_train : n_train + 20]


def test_token_ids_are_not_cast_to_the_model_dtype(corpus: Path) -> None:
    train, _, _ = load_text_dataset(corpus, context=16, train_size=8)
    loader = BatchLoader(train)
    assert loader.kind == "computed"
    ((x, y),) = list(loader.iterate([torch.arange(8)], "cpu", torch.float64, epoch=0))
    assert x.dtype == torch.long and y.dtype == torch.long
    images = SimpleNamespace(
        images=torch.zeros(4, 1, 2, 2, dtype=torch.uint8), labels=torch.zeros(4)
    )
    ((xi, _),) = list(BatchLoader(images).iterate([torch.arange(4)], "cpu", torch.float64))
    assert xi.dtype == torch.float64  # images still arrive in the model dtype


# --- the task ------------------------------------------------------------------------------------


def test_task_loss_and_metrics_are_per_token_cross_entropy_and_bits() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(3, 5, 7), torch.randint(7, (3, 5))
    task = LanguageModelling(vocab_size=7)
    ce = F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1))
    torch.testing.assert_close(task.loss(logits, target), ce)
    sums = task.metrics(logits, target)
    assert task.count(target) == 15
    assert sums["loss"] / 15 == pytest.approx(float(ce), rel=1e-6)
    assert sums["bpc"] == pytest.approx(sums["loss"] / math.log(2))
    assert sums["acc"] == float((logits.argmax(-1) == target).sum())
    with pytest.raises(ValueError, match=r"logits \[batch, length, vocab\]"):
        task.loss(logits[:, :, 0], target)


def test_task_divergence_verdict_needs_a_loss_above_the_uniform_guess_and_rising() -> None:
    task = LanguageModelling(vocab_size=8)
    assert "uniform guess" in task.divergence({"test_loss": 2.2}, 2.0, 3.0)  # ln 8 = 2.079
    assert task.divergence({"test_loss": 1.5}, 2.0, 3.0) == ""
    assert task.divergence({"test_loss": 2.2}, 3.0, 2.5) == ""
    assert task.divergence({"test_loss": 2.2}, 3.0, 3.2) == ""  # a rise within noise


def test_solver_statistics_are_per_sequence_weighted_by_tokens() -> None:
    info = SimpleNamespace(
        nstep=torch.tensor([4.0, 8.0]),
        rel_residual=torch.tensor([1e-3, 3e-3]),
        converged=torch.tensor([True, False]),
    )
    nstep, res, conv = forward_stats(info, units=2 * 16)  # two sequences of 16 tokens
    assert nstep / 32 == pytest.approx(6.0) and conv / 32 == pytest.approx(0.5)
    assert res / 32 == pytest.approx(2e-3)
    assert forward_stats(info)[0] == pytest.approx(12.0)  # one unit per sample: plain sums


# --- config errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"data": {"path": None}}, "data.path"),
        ({"data": {"context": None}}, "data.context"),
        ({"data": {"augment": True}}, "data.augment"),
        ({"task": {"name": "image_classification"}}, "task.name"),
        ({"train": {"warm_start": True}}, "train.warm_start"),
    ],
)
def test_config_problems_name_the_key(corpus: Path, change: dict, key: str) -> None:
    raw = lm_config(corpus)
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_language_modelling_on_images_names_the_task_key() -> None:
    with pytest.raises(ConfigError, match=r"task\.name.*data\.name: text"):
        config_from_dict({"task": {"name": "language_modelling"}, "data": {"name": "digits"}})


def test_text_keys_on_an_image_set_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.context: applies to data set 'text'"):
        config_from_dict({"data": {"name": "digits", "context": 8}})


def test_missing_or_empty_corpus_is_one_line_exit_2(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for path, words in ((tmp_path / "nope.txt", "data.path"), (empty, "empty")):
        cfg = tmp_path / f"{path.stem}.yaml"
        cfg.write_text(json.dumps(lm_config(path)))
        rc = train_main(["--config", str(cfg), "--out", str(tmp_path / f"run_{path.stem}")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and words in err, err
        assert not (tmp_path / f"run_{path.stem}").exists()


# --- training, resume, eval, sample ----------------------------------------------------------


def test_a_language_model_trains_and_logs_its_metrics(tmp_path: Path, corpus: Path) -> None:
    run = tmp_path / "run"
    result = run_training(lm_config(corpus), run, progress=False)
    assert math.isfinite(result["test_loss"])
    vocab = json.loads((run / "vocab.json").read_text())
    assert vocab["kind"] == "char" and "".join(vocab["chars"]) == "".join(
        sorted(set(corpus.read_text()))
    )
    steps = records(run, "step")
    assert len(steps) == 8  # 2 epochs of 32 windows in batches of 8
    for r in steps:
        assert r["n"] == 8 * 16  # tokens
        assert r["tokens_per_s"] > 0 and 0.0 <= r["fwd_converged"] <= 1.0
        assert r["train_bpc"] == pytest.approx(r["train_loss"] / math.log(2))
        assert r["train_cpu_s"] > 0 and r["train_time_s"] > 0
    last = records(run, "epoch")[-1]
    assert last["test_n"] == 8 * 16
    assert last["test_bpc"] == pytest.approx(last["test_loss"] / math.log(2))
    assert last["best_test_loss"] == min(r["test_loss"] for r in records(run, "epoch"))
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["vocab"] == vocab


@pytest.mark.slow
def test_a_resumed_language_model_matches_the_uninterrupted_run(
    tmp_path: Path, corpus: Path
) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_training(lm_config(corpus), straight, progress=False)
    run_training(lm_config(corpus, train={"epochs": 1}), split, progress=False)
    raw = lm_config(corpus)
    run_training(raw, split, resume=True, progress=False)
    a = torch.load(straight / "last.pt", weights_only=False)["model"]
    b = torch.load(split / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_vocabulary_mismatch_on_resume_is_one_line_and_changes_nothing(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(json.dumps(lm_config(corpus, train={"epochs": 1})))
    assert train_main(["--config", str(cfg), "--out", str(run)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    corpus.write_text(corpus.read_text() + "ZEBRA!\n", encoding="utf-8")  # new characters
    again = ["--config", str(cfg), "--out", str(run), "--resume", "--set", "train.epochs=2"]
    rc = train_main(again)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "vocabulary mismatch" in err and "'!'" in err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before


def test_sample_and_eval_read_the_run(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run_training(lm_config(corpus, train={"epochs": 1}), run, progress=False)
    capsys.readouterr()
    args = [str(run), "--prompt", "speaker:", "--tokens", "25", "--top-k", "5", "--seed", "1"]
    assert sample_main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("speaker:") and len(text) == len("speaker:") + 25 + 1
    assert set(text[:-1]) <= set(corpus.read_text())
    assert sample_main(args) == 0 and capsys.readouterr().out == text  # same seed, same text
    assert eval_main([str(run)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_bpc"] == pytest.approx(report["test_loss"] / math.log(2))
    assert report["test_n"] == 8 * 16


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--prompt", "SPEAKER"], "characters not in the vocabulary"),
        (["--temperature", "0"], "--temperature"),
        (["--tokens", "-1"], "--tokens"),
        (["--top-k", "0"], "--top-k"),
    ],
)
def test_sample_refuses_bad_options_in_one_line(
    tmp_path: Path,
    corpus: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    words: str,
) -> None:
    run = tmp_path / "run"
    run_training(lm_config(corpus, train={"epochs": 1}), run, progress=False)
    capsys.readouterr()
    assert sample_main([str(run), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_sample_refuses_a_classifier_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import tiny_config

    run = tmp_path / "clf"
    run_training(tiny_config(), run, progress=False)
    capsys.readouterr()
    assert sample_main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "language_modelling" in err
