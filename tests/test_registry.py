"""User solvers and estimators: the public registries (``pdq.solvers.register``,
``pdq.grad.register``) make a user class usable by name in ``from_name``, in the training
config (its options validated as a built-in's) and in ``--set``; bad registrations are refused
naming the argument. Per-call solver options (``DEQ.forward(..., solver_kwargs=...)``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import phantomdeq as pdq
import phantomdeq.train  # noqa: F401 - the config sections generated before the plugins register


@pytest.fixture
def plugins() -> Iterator[ModuleType]:
    """``tests/user_plugins.py`` imported (its classes registered), unregistered afterwards so
    that no other test sees them."""
    sys.modules.pop("user_plugins", None)
    import user_plugins

    try:
        yield user_plugins
    finally:
        pdq.solvers.unregister("relaxed")
        pdq.grad.unregister("halfstep")
        sys.modules.pop("user_plugins", None)


class Cell(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.mul_(0.3)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


def _grads(deq: pdq.DEQ, x: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    deq.zero_grad()
    z, _ = deq(torch.zeros_like(x), x, **kw)
    (z**2).sum().backward()
    return z.detach(), [p.grad.clone() for p in deq.parameters()]


# --------------------------------------------------------------------------- Python API


def test_registered_classes_work_by_name_and_in_a_deq(plugins: ModuleType) -> None:
    """The user solver equals FixedPoint with the same damping; the user estimator equals
    UPG(k=1, lam=alpha) (float64)."""
    torch.manual_seed(0)
    cell, x = Cell(), torch.randn(3, 6, dtype=torch.float64)
    solver = pdq.solvers.from_name("relaxed", max_iter=40, tol=1e-10, relax=0.7)
    assert isinstance(solver, plugins.Relaxed) and pdq.solvers.options("relaxed")["relax"]
    est = pdq.grad.from_name("halfstep", alpha=0.5)
    assert isinstance(est, plugins.HalfStep) and "alpha" in pdq.grad.options("halfstep")
    ours = pdq.DEQ(cell, solver=solver, grad=est)
    ref = pdq.DEQ(
        cell,
        solver=pdq.FixedPoint(max_iter=40, tol=1e-10, damping=0.7),
        grad=pdq.grad.UPG(k=1, lam=0.5),
    )
    (za, ga), (zb, gb) = _grads(ours, x), _grads(ref, x)
    assert torch.allclose(za, zb, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ga, gb))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['beta'\].*allowed: .*relax"):
        pdq.solvers.from_name("relaxed", beta=0.5)
    with pytest.raises(ValueError, match="relax must be in"):
        pdq.solvers.from_name("relaxed", relax=2.0)


class _NoOptions(pdq.grad.GradientEstimator):
    def __init__(self) -> None:
        pass


class _NotAnEstimator:
    def __init__(self, *, a: int = 1) -> None:
        self.a = a


class _NotASolver:
    def __init__(self, *, max_iter: int = 3) -> None:
        self.max_iter = max_iter


@pytest.mark.parametrize(
    ("register", "name", "cls", "error", "pattern"),
    [
        (
            pdq.solvers.register,
            "anderson",
            pdq.Anderson,
            ValueError,
            r"name 'anderson' is a built-in",
        ),
        (pdq.solvers.register, "picard", pdq.Anderson, ValueError, r"name 'picard' is a built-in"),
        (pdq.grad.register, "upg", pdq.grad.UPG, ValueError, r"name 'upg' is a built-in"),
        (pdq.grad.register, "My-Est", _NotAnEstimator, ValueError, r"name must be a lower-case"),
        (pdq.grad.register, "est", _NotAnEstimator(), TypeError, r"cls must be a class"),
        (pdq.grad.register, "est", _NoOptions, TypeError, r"cls _NoOptions declares no keyword"),
        (pdq.grad.register, "est", _NotAnEstimator, TypeError, r"must subclass .*GradientEst"),
        (pdq.solvers.register, "mine", _NotASolver, TypeError, r"_NotASolver follows no solver"),
    ],
)
def test_bad_registrations_are_refused_naming_the_argument(
    register: Any, name: str, cls: Any, error: type, pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        register(name, cls)
    assert name not in pdq.grad.ESTIMATORS or name == "upg"
    assert name not in pdq.solvers.BACKWARD_SOLVERS or name in ("anderson", "picard")


def test_a_name_taken_by_another_class_is_refused(plugins: ModuleType) -> None:
    class Other(plugins.HalfStep):
        pass

    with pytest.raises(ValueError, match=r"'halfstep' is already registered for user_plugins"):
        pdq.grad.register("halfstep", Other)
    assert pdq.grad.register("halfstep", plugins.HalfStep) is plugins.HalfStep  # idempotent


# --------------------------------------------------------------------------- per-call options


def test_solver_kwargs_override_one_call() -> None:
    """``solver_kwargs`` solves one call with the options replaced (the same result as a DEQ
    built with them); the DEQ's own solver is unchanged; unknown keys name the allowed."""
    torch.manual_seed(0)
    cell, x = Cell(), torch.randn(3, 6, dtype=torch.float64)
    deq = pdq.DEQ(cell, solver=pdq.Anderson(max_iter=3, tol=0.0, m=2), grad=pdq.grad.UPG(k=2))
    ref = pdq.DEQ(cell, solver=pdq.Anderson(max_iter=9, tol=0.0, m=2), grad=pdq.grad.UPG(k=2))
    (za, ga), (zb, gb) = _grads(deq, x, solver_kwargs={"max_iter": 9}), _grads(ref, x)
    assert torch.equal(za, zb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
    _, info = deq(torch.zeros_like(x), x)
    assert int(info.nstep.max()) <= 3 and deq.solver.max_iter == 3
    with pytest.raises(ValueError, match=r"DEQ: solver_kwargs: unknown option\(s\) \['iters'\]"):
        deq(torch.zeros_like(x), x, solver_kwargs={"iters": 9})
    with pytest.raises(ValueError, match=r"DEQ: solver_kwargs: .*max_iter must be"):
        deq(torch.zeros_like(x), x, solver_kwargs={"max_iter": 1})
    with pytest.raises(TypeError, match=r"DEQ: solver_kwargs must be a dict"):
        deq(torch.zeros_like(x), x, solver_kwargs=[("max_iter", 9)])
    copy = pdq.solvers.with_options(pdq.Broyden(memory=4), tol=1e-6)
    assert (copy.memory, copy.tol) == (4, 1e-6)


# --------------------------------------------------------------------------- config and CLI


def test_config_takes_registered_names_and_options(plugins: ModuleType) -> None:
    from phantomdeq.train import ConfigError, config_from_dict
    from phantomdeq.train.build import build_grad, build_solver

    raw = {
        "plugins": ["user_plugins"],
        "solver": {"name": "relaxed", "relax": 0.5, "max_iter": 7},
        "grad": {"name": "halfstep", "alpha": 0.25},
    }
    cfg = config_from_dict(raw)
    solver, est = build_solver(cfg.solver), build_grad(cfg.grad)
    assert (type(solver).__name__, solver.relax, solver.max_iter) == ("Relaxed", 0.5, 7)
    assert (type(est).__name__, est.alpha) == ("HalfStep", 0.25)
    bad = [
        (
            {"solver": {"name": "relaxed", "relax": "half"}},
            r"solver\.relax: input should be a valid number; got str 'half'",
        ),
        (
            {"solver": {"name": "relaxed", "relax": 2.0}},
            r"solver\.relax: Relaxed: relax must be in \(0, 1\]",
        ),
        (
            {"solver": {"name": "anderson", "relax": 0.5}},
            r"solver\.relax: unknown key; allowed keys in solver: name, max_iter",
        ),
        (
            {"grad": {"name": "halfstep", "alpha": True}},
            r"grad\.alpha: input should be a valid number; got bool True",
        ),
        ({"grad": {"name": "halfsteps"}}, r"grad\.name: input should be .*'shine' or 'halfstep'"),
    ]
    for extra, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            config_from_dict({"plugins": ["user_plugins"], **extra})
    with pytest.raises(ConfigError, match=r"plugins\[0\]: cannot import module 'no_such_plugin'"):
        config_from_dict({"plugins": ["no_such_plugin"]})


def test_one_epoch_from_a_config_file_with_set(
    plugins: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI: a config naming the plugin module trains one epoch with the user solver and
    estimator, their options given in the file and by ``--set``."""
    import yaml

    from conftest import TINY_CONFIG
    from phantomdeq.train import commands, load_config

    raw = {**TINY_CONFIG, "plugins": ["user_plugins"]}
    raw["solver"] = {"name": "relaxed", "max_iter": 6, "tol": 1e-3, "relax": 0.8}
    raw["grad"] = {"name": "halfstep"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    sets = ["--set", "grad.alpha=0.75", "--set", "solver.relax=0.9"]
    cfg = load_config(path, ["grad.alpha=0.75", "solver.relax=0.9"])
    assert cfg.grad.kwargs() == {"alpha": 0.75} and cfg.solver.kwargs()["relax"] == 0.9
    rc = commands.main(["--config", str(path), "--out", str(tmp_path / "run"), *sets])
    out, err = capsys.readouterr()
    assert rc == 0, err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["solver"]["relax"] == 0.9 and saved["grad"]["alpha"] == 0.75
    assert saved["plugins"] == ["user_plugins"]
