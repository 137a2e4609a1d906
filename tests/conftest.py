"""Fixtures and helpers shared by the tests.

Tiers: ``pytest`` with no arguments runs the fast tier (``-m "not slow"`` in pyproject's
addopts); ``make test-all`` (``pytest -m "slow or not slow"``) adds the tests marked
``@pytest.mark.slow``: full training runs, subprocess and multi-process runs, and the
expensive twin of a property a fast test already proves. Naming a test file or id runs all
of it (:func:`pytest_configure`).

The training helpers are plain functions (test modules import them: ``from conftest import
tiny_config``), one definition each instead of a copy per module; so is :func:`load_file`,
which imports a script or tool that is not part of the package.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

#: MDEQ-Tiny on 64 digits images, one full-batch step per epoch, no dropout, on the CPU.
TINY_CONFIG: dict[str, dict[str, Any]] = {
    "model": {"name": "mdeq_tiny", "dropout": 0.0},
    "data": {"name": "digits", "train_size": 64, "test_size": 64, "batch_size": 64},
    "solver": {"name": "anderson", "max_iter": 6, "tol": 1e-3},
    "grad": {"name": "upg", "k": 2, "lam": 0.5},
    "optim": {"name": "adam", "lr": 3e-3, "weight_decay": 0.0, "schedule": "constant"},
    "train": {"epochs": 1, "seed": 0, "num_threads": 1, "device": "cpu"},
    "log": {"progress": False, "tensorboard": False, "plot": False},
}


def tiny_config(
    *layers: Mapping[str, Mapping[str, Any]], **sections: Mapping[str, Any]
) -> dict[str, Any]:
    """A raw training config: :data:`TINY_CONFIG` with each layer, then the keyword sections,
    updating the sections they name key by key (``tiny_config(train={"epochs": 3})``).

    A module whose tests share other defaults binds them once:
    ``tiny_config = functools.partial(conftest.tiny_config, {"train": {"epochs": 3}})``.
    """
    raw = copy.deepcopy(TINY_CONFIG)
    for layer in (*layers, sections):
        for name, values in layer.items():
            raw.setdefault(name, {}).update(copy.deepcopy(dict(values)))
    return raw


def steps(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of a run's metrics.jsonl."""
    from phantomdeq.train.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]


def pytest_configure(config: pytest.Config) -> None:
    """Naming test files or test ids (``pytest tests/test_train.py``) runs every test they hold,
    slow ones included; the default ``-m "not slow"`` applies to directories (and to bare
    ``pytest``), and an explicit ``-m`` always wins."""
    explicit_m = any(a.startswith("-m") for a in config.invocation_params.args)
    named = [a for a in config.args if a.split("::")[0].endswith(".py")]
    if named and not explicit_m and config.option.markexpr == "not slow":
        config.option.markexpr = ""


@pytest.fixture(params=[False, True], ids=["tensor", "tuple"])
def tuple_state(request):
    return request.param


def load_file(path: Path, name: str, *, sibling_imports: bool = False) -> ModuleType:
    """Import the file ``path`` (a benchmark script, a tool) as the module ``name``, registered
    in ``sys.modules`` (its dataclasses look their module up there). ``sibling_imports``: its
    folder is on ``sys.path`` while it loads, for a file that imports the files beside it."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    folder = str(Path(path).parent)
    if sibling_imports:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(mod)
    finally:
        if sibling_imports:
            sys.path.remove(folder)
    return mod
