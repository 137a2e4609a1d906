"""Typed YAML configs: parsing, errors naming key and expected type, overrides, data roots."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from phantomdeq.train import commands  # noqa: E402
from phantomdeq.train.config import (  # noqa: E402
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    resolve_data_root,
)
from phantomdeq.train.run_folder import dump_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
MNIST = REPO.parent / "shared" / "data" / "mnist"


def _raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize(
    "name",
    [
        "mdeq_tiny_digits.yaml",
        "mdeq_tiny_mnist.yaml",
        "mdeq_tiny_cifar10.yaml",
        "mdeq_cifar10m.yaml",
        "mdeq_imagenet18m.yaml",
    ],
)
def test_shipped_configs_parse(name: str) -> None:
    cfg = config_from_dict(_raw(name))
    assert isinstance(cfg, Config)
    # the resolved mapping survives a round trip
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_cifar10_recipe_is_the_papers_ablation_setting() -> None:
    cfg = config_from_dict(_raw("mdeq_tiny_cifar10.yaml"))
    assert cfg.model.name == "mdeq_tiny"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.1, 0.9)
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.schedule == "cosine"
    assert cfg.train.epochs == 50 and cfg.data.batch_size == 128
    assert (cfg.grad.name, cfg.grad.k, cfg.grad.lam) == ("upg", 5, 0.5)
    assert cfg.solver.max_iter == 22


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"optim\.lrr: unknown key; allowed keys in optim: name, lr"
    ):
        config_from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"optimizer: unknown key; allowed keys in config: model"):
        config_from_dict({"optimizer": {}})
    with pytest.raises(ConfigError, match=r"grad\.backward_solver\.iters: unknown key"):
        config_from_dict({"grad": {"backward_solver": {"iters": 3}}})


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        ({"optim": {"lr": "fast"}}, r"optim\.lr: input should be a valid number; got str 'fast'"),
        (
            {"train": {"epochs": 2.5}},
            r"train\.epochs: input should be a valid integer; got float 2\.5",
        ),
        ({"train": {"epochs": True}}, r"train\.epochs: input should be a valid integer; got bool"),
        ({"log": {"progress": "yes"}}, r"log\.progress: input should be a valid boolean; got str"),
        (
            {"data": {"train_size": "all"}},
            r"data\.train_size: input should be a valid integer or null; got str 'all'",
        ),
        (
            {"optim": {"name": "rmsprop"}},
            r"optim\.name: input should be 'sgd', 'adam' or 'adamw'; got str 'rmsprop'",
        ),
        (
            {"grad": {"name": "exact"}},
            r"grad\.name: input should be 'ift', 'upg', 'npg', 'onestep', 'bptt' or 'shine'",
        ),
        (
            {"solver": {"name": "newton"}},
            r"solver\.name: input should be 'fixed_point', 'anderson' or 'broyden'",
        ),
        ({"optim": {"betas": 0.9}}, r"optim\.betas: input should be a valid list; got float 0\.9"),
        ({"optim": 3}, r"optim: expected a mapping, got int 3"),
        ({"model": {"overrides": [1]}}, r"model\.overrides: input should be a valid dictionary"),
    ],
)
def test_wrong_type_names_key_and_expected_type(raw: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(raw)


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        ({"optim": {"lr": -1.0}}, r"optim\.lr: input should be greater than 0; got float -1\.0"),
        ({"grad": {"lam": 1.5}}, r"grad\.lam: UPG: lam must be in \(0, 1\]"),
        ({"grad": {"k": 0}}, r"grad\.k: UPG: k must be an integer >= 1"),
        # a shared option's error names the configured class, not the first one registered
        ({"grad": {"name": "npg", "k": 0}}, r"grad\.k: NPG: k must be an integer >= 1"),
        ({"solver": {"max_iter": 1}}, r"solver\.max_iter: Anderson: max_iter must be"),
        (
            {"solver": {"name": "broyden", "max_iter": 1}},
            r"solver\.max_iter: Broyden: max_iter must be",
        ),
        (
            {"train": {"pretrain_steps": 5}},
            r"train\.unrolled_steps: must be >= 1 when pretrain_steps > 0",
        ),
        ({"train": {"device": "tpu"}}, r"train\.device: allowed 'auto', 'cpu', 'cuda'"),
        ({"data": {"name": "mnist"}}, r"data\.root: required for data set 'mnist'"),
        ({"data": {"download": True}}, r"data\.download: only names 'mnist' and 'cifar10'"),
    ],
)
def test_out_of_range_values(raw: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(raw)


def test_ints_and_yaml11_exponent_strings_are_floats() -> None:
    cfg = config_from_dict({"optim": {"lr": 1, "weight_decay": "1e-4"}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(1e-4)


def test_overrides_are_typed_like_the_file() -> None:
    raw = apply_overrides(
        {"optim": {"lr": 0.1}},
        parse_overrides(
            ["optim.lr=0.05", "grad.name=ift", "data.train_size=null", "train.epochs=3"]
        ),
    )
    cfg = config_from_dict(raw)
    assert cfg.optim.lr == 0.05 and cfg.grad.name == "ift" and cfg.train.epochs == 3
    assert cfg.data.train_size is None
    with pytest.raises(ConfigError, match=r"--set: expected key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(
        ConfigError, match=r"optim\.lr\.x: is not a section|optim\.lr: is not a section"
    ):
        apply_overrides({"optim": {"lr": 0.1}}, [("optim.lr.x", 1)])


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    cfg = config_from_dict({"optim": {"name": "adam", "lr": 3e-4}, "eval_solver": {"max_iter": 40}})
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_missing_data_directory_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: mnist\n  root: no/such/dir\n")
    with pytest.raises(
        ConfigError, match=r"data\.root: directory 'no/such/dir' not found \(tried: "
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"data\.root: directory '/no/such/abs' does not exist"):
        resolve_data_root("/no/such/abs")


def test_cli_reports_config_errors_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: digits\n")
    code = commands.main(
        ["--config", str(path), "--out", str(tmp_path / "run"), "--set", "optim.nope=1"]
    )
    assert code == 2
    assert "optim.nope: unknown key" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  name: mnist\n  root: missing-mnist\n")
    assert commands.main(["--config", str(bad), "--out", str(tmp_path / "run2")]) == 2
    assert "data.root: directory 'missing-mnist' not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()
    with pytest.raises(SystemExit) as exc:
        commands.main(["--config", str(path), "--bogus"])
    assert exc.value.code == 2
    assert "--bogus" in capsys.readouterr().err


@pytest.mark.skipif(not MNIST.is_dir(), reason="shared MNIST folder not present")
def test_mnist_config_finds_the_shared_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository: found via the config file's location
    cfg = load_config(CONFIGS / "mdeq_tiny_mnist.yaml")
    assert Path(cfg.data.root) == MNIST.resolve()
    monkeypatch.chdir(REPO)
    assert Path(load_config("configs/mdeq_tiny_mnist.yaml").data.root) == MNIST.resolve()


def test_solver_and_estimator_sections_are_the_classes_keyword_options() -> None:
    """One owner per option: the solver/grad sections hold exactly the registry classes'
    keyword-only options (types and defaults from the signatures), and a run passes each
    class only its own."""
    import phantomdeq as pdq
    from phantomdeq.train.build import build_grad, build_solver
    from phantomdeq.train.config import GradConfig, SolverConfig

    declared = {k for n in pdq.solvers.SOLVERS for k in pdq.solvers.options(n)}
    assert set(SolverConfig.model_fields) == {"name"} | declared
    grad_declared = {k for n in pdq.grad.ESTIMATORS for k in pdq.grad.options(n)}
    # plus the config-only sections: IFT's solver and the fixed-point correction
    own = {"name", "backward_solver", "correction"}
    assert set(GradConfig.model_fields) == own | grad_declared - {"solver"}
    cfg = config_from_dict(
        {
            "solver": {"name": "fixed_point", "freeze_converged": True, "check_every": 3},
            "grad": {"name": "ift", "warn_unconverged": False},
        }
    )
    solver = build_solver(cfg.solver)
    assert isinstance(solver, pdq.FixedPoint) and solver.freeze_converged
    assert solver.check_every == 3 and solver.max_iter == 22  # the training default
    assert set(cfg.solver.kwargs()) == set(pdq.solvers.options("fixed_point"))
    ift = build_grad(cfg.grad)
    assert isinstance(ift, pdq.IFT) and ift.warn_unconverged is False
    assert isinstance(ift.solver, pdq.FixedPoint) and ift.solver.tol == 1e-6
    with pytest.raises(
        ConfigError, match=r"solver\.memory: input should be a valid integer or null"
    ):
        config_from_dict({"solver": {"memory": "all"}})
    with pytest.raises(
        ConfigError, match=r"solver\.check_every: \w+: check_every must be an integer >= 1"
    ):
        config_from_dict({"solver": {"check_every": 0}})


NEW_ESTIMATOR = """
import json
import phantomdeq as pdq
from phantomdeq.grad.unrolled import UPG


class Halfway(UPG):
    name = "halfway"

    def __init__(self, *, k: int = 2, lam: float = 0.5, scale: float = 1.0) -> None:
        super().__init__(k=k, lam=lam)
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"Halfway: scale must be in (0, 1], got {scale!r}")
        self.scale = scale


pdq.grad.ESTIMATORS["halfway"] = Halfway  # the registry line: nothing else is edited

from phantomdeq.experiments import ablation, cost
from phantomdeq.train.build import build_grad
from phantomdeq.train.config import ConfigError, config_from_dict, load_config, unused_options

cfg = config_from_dict({"grad": {"name": "halfway", "scale": 0.25, "k": 3}})
est = build_grad(cfg.grad)
try:
    config_from_dict({"grad": {"scale": 2.0}})
    refused = ""
except ConfigError as exc:
    refused = str(exc)
print(json.dumps({
    "type": type(est).__name__, "scale": est.scale, "k": est.k,
    "refused": refused,
    "alias": ablation.GRID_ALIASES.get("scale"),
    "unused_for_upg": "grad.scale" in unused_options(config_from_dict({})),
    "methods": [m.name for m in cost.method_specs((2,)) if m.estimator == "halfway"],
}))
"""


@pytest.mark.slow
def test_a_new_estimator_is_one_class_and_its_registry_line() -> None:
    """Registering an estimator class is all it takes: its options become config keys (typed and
    validated by the class, refusals naming the dotted key), grid short keys, collapsed when
    another estimator runs, and rows of the cost table."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", NEW_ESTIMATOR], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["type"], out["scale"], out["k"]) == ("Halfway", 0.25, 3)
    assert out["refused"].startswith("grad.scale: Halfway: scale must be in (0, 1]")
    assert out["alias"] == "grad.scale" and out["unused_for_upg"] is True
    assert out["methods"] == ["halfway_k2"]  # no checkpoint option: no checkpointed variant
