"""Gradient-quality monitor: its cosine / norm ratio against gradients computed independently,
its exact gradient against dense linear algebra (eq. 4), and that it leaves no trace on the
training state (.grad, BatchNorm statistics, RNG states, the model's estimator)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import phantomdeq as pdq
from phantomdeq.diagnostics import exact_gradient
from phantomdeq.models import MDEQ, MDEQConfig
from phantomdeq.train.monitor import GradientMonitor, cosine_and_ratio

# loose IFT backward budgets are intended here: their warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:IFT backward solve did not reach:RuntimeWarning")


def _mdeq(grad: pdq.GradientEstimator) -> MDEQ:
    cfg = MDEQConfig(
        name="monitor_test",
        channels=(8, 8),
        head_channels=(4, 8),
        final_channels=16,
        expansion=2,
        num_groups=4,
        dropout=0.3,  # shared variational dropout: both gradients must see the same mask
    )
    torch.manual_seed(0)
    model = MDEQ(
        cfg,
        num_classes=10,
        in_channels=1,
        solver=pdq.Anderson(max_iter=15, tol=1e-8),
        grad=grad,
    ).double()
    return model


def _tight_ift() -> pdq.IFT:
    return pdq.IFT(solver=pdq.Broyden(max_iter=20, tol=1e-9))


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (3,), generator=g)
    return x, y


def _cell_grad(model: MDEQ, x: Tensor, y: Tensor, seed: int) -> list[Tensor]:
    """Gradient of the cross-entropy w.r.t. the cell parameters, computed directly."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = F.cross_entropy(model(x, generator=gen).logits, y)
    params = [p for p in model.deq.f.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("used", [pdq.UPG(k=3, lam=0.5), pdq.NPG(k=3, lam=0.5)], ids=["upg", "npg"])
def test_monitor_cosine_matches_direct_computation(used: pdq.GradientEstimator) -> None:
    model = _mdeq(used)
    x, y = _batch()
    # Independent computation: run the model twice with the same dropout seed, once with the
    # training estimator and once with a tight IFT, and take the cosine of the flat gradients.
    g_used = _cell_grad(model, x, y, seed=5)
    model.deq.grad = _tight_ift()
    g_exact = _cell_grad(model, x, y, seed=5)
    model.deq.grad = used
    a = torch.cat([g.reshape(-1) for g in g_used])
    b = torch.cat([g.reshape(-1) for g in g_exact])
    cos_direct = float(a @ b / (a.norm() * b.norm()))
    ratio_direct = float(a.norm() / b.norm())

    gen = torch.Generator().manual_seed(5)
    res = GradientMonitor(_tight_ift()).measure_classifier(model, x, y, generator=gen)
    assert abs(res["cosine"] - cos_direct) < 1e-6
    assert abs(res["norm_ratio"] - ratio_direct) < 1e-6
    assert res["time_s"] > 0.0
    assert math.isfinite(res["exact_bwd_residual"]) and res["exact_bwd_niter"] >= 1
    # A phantom gradient is an approximation: the test must be able to tell them apart.
    assert res["cosine"] < 1.0 - 1e-6


def test_monitor_exact_vs_exact_is_one_and_dropout_masks_match() -> None:
    # With the training estimator itself a tight IFT, the two gradients coincide only if both
    # passes used the same dropout mask and the same forward solution.
    model = _mdeq(_tight_ift())
    x, y = _batch()
    res = GradientMonitor(_tight_ift()).measure_classifier(
        model, x, y, generator=torch.Generator().manual_seed(3)
    )
    assert res["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert res["norm_ratio"] == pytest.approx(1.0, abs=1e-7)


def test_monitor_leaves_training_state_untouched() -> None:
    used = pdq.UPG(k=2, lam=0.5)
    model = _mdeq(used)
    x, y = _batch()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    buffers = [b.clone() for b in model.buffers()]
    assert any(b.numel() > 1 for b in buffers)  # BatchNorm statistics of the stem / head
    gen = torch.Generator().manual_seed(11)
    gen_state = gen.get_state()
    torch.manual_seed(123)
    rng_state = torch.get_rng_state()
    solver = model.deq.solver
    model.eval()

    GradientMonitor(_tight_ift(), params="all").measure_classifier(model, x, y, generator=gen)

    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(gen.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert model.deq.grad is used and model.deq.solver is solver
    assert not model.training


class _TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b) with ||W||_2 = 0.6 (a contraction)."""

    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(0.6 * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(d, n, generator=g, dtype=torch.float64) / math.sqrt(n))
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class _TinyModel(nn.Module):
    def __init__(self, grad: pdq.GradientEstimator) -> None:
        super().__init__()
        self.deq = pdq.DEQ(
            _TanhCell(5, 3), solver=pdq.FixedPoint(max_iter=300, tol=1e-13), grad=grad
        )
        self.readout = nn.Parameter(torch.linspace(-1.0, 1.0, 5, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        z, _ = self.deq(x.new_zeros(x.shape[0], 5), x)
        return ((z @ self.readout) ** 2).sum()


def _fixed_point(model: _TinyModel, x: Tensor) -> Tensor:
    """h* of the tiny model's cell by 300 plain fixed-point steps from zero, without the
    library's solvers (the cell is a contraction: float64 rounding is reached)."""
    cell = model.deq.f
    with torch.no_grad():
        z = torch.zeros(x.shape[0], 5, dtype=torch.float64)
        for _ in range(300):
            z = cell(z, x)
    return z


@pytest.mark.parametrize("used", [pdq.UPG(k=4, lam=0.7), pdq.BPTT()], ids=["upg", "bptt"])
def test_monitor_exact_gradient_equals_dense_ift(used: pdq.GradientEstimator) -> None:
    model = _TinyModel(used)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mon = GradientMonitor(pdq.IFT(solver=pdq.Broyden(max_iter=60, tol=1e-12)))
    g_used, g_exact, _ = mon.gradients(model, lambda: model(x))

    cell = model.deq.f
    params = list(cell.parameters())
    z = _fixed_point(model, x)
    zr = z.clone().requires_grad_(True)
    dz = torch.autograd.grad(((zr @ model.readout) ** 2).sum(), zr)[0]
    dense = exact_gradient(cell, z, (x,), params, dz)
    for a, b in zip(g_exact, dense):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-7)
    # UPG / BPTT on a contraction are close to, but not exactly, the exact gradient.
    cos, ratio, _, _ = cosine_and_ratio(g_used, dense)
    if isinstance(used, pdq.UPG):
        assert 0.9 < cos < 1.0 - 1e-9
    else:  # BPTT through 300 converged iterations = the exact gradient
        assert cos == pytest.approx(1.0, abs=1e-9)
    assert ratio > 0.0


def test_monitor_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="params"):
        GradientMonitor(params="head")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exact"):
        GradientMonitor(exact=pdq.BPTT())
    with pytest.raises(ValueError, match="no phantomdeq.DEQ"):
        GradientMonitor().measure(nn.Linear(2, 2), lambda: torch.zeros(()))


@pytest.mark.slow
def test_trainer_monitor_logs_and_does_not_change_training(tmp_path) -> None:
    import json

    from phantomdeq.train import run_training
    from phantomdeq.train.config import ConfigError, config_from_dict

    raw = {
        "model": {
            "name": "mdeq_tiny",
            "dropout": 0.2,  # the monitor must reuse (and not consume) the step's dropout mask
            "overrides": {
                "channels": [8, 8],
                "head_channels": [4, 4],
                "final_channels": 16,
                "expansion": 2,
                "num_groups": 4,
            },
        },
        "data": {"name": "digits", "train_size": 48, "test_size": 40, "batch_size": 16},
        "solver": {"name": "anderson", "max_iter": 4, "tol": 1e-3},
        "grad": {"name": "upg", "k": 2, "lam": 0.5},
        "optim": {"name": "adam", "lr": 1e-2, "weight_decay": 0.0},
        "train": {
            "epochs": 1,
            "num_threads": 1,
            "monitor_every": 2,
            "monitor_solver": {"name": "broyden", "max_iter": 15, "tol": 1e-6},
            "monitor_compare": [{"name": "npg", "k": 2, "lam": 0.5}],
        },
        "log": {"progress": False, "tensorboard": False, "plot": True},
    }
    with_monitor = run_training(config_from_dict(raw), tmp_path / "on", progress=False)
    raw["train"]["monitor_every"] = 0
    raw["train"]["monitor_compare"] = []
    without = run_training(config_from_dict(raw), tmp_path / "off", progress=False)

    def steps(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "step"]

    on, off = steps("on"), steps("off")
    assert [r["train_loss"] for r in on] == [r["train_loss"] for r in off]
    assert with_monitor["test_acc"] == without["test_acc"]
    monitored = [r for r in on if "monitor_cos" in r]
    assert [r["step"] for r in monitored] == [1, 3]  # steps 0 and 2 (logged after the update)
    for r in monitored:
        assert -1.0 <= r["monitor_cos"] <= 1.0 and r["monitor_norm_ratio"] > 0
        assert r["monitor_time_s"] > 0
        # the compared estimator (not used for training) is logged under its label
        assert -1.0 <= r["monitor_cos_npg_k2_lam0.5"] <= 1.0
        assert r["monitor_norm_ratio_npg_k2_lam0.5"] > 0
    assert not any("monitor_cos" in r for r in off)
    assert (tmp_path / "on" / "curves.png").is_file()
    raw["train"]["monitor_every"] = -1
    with pytest.raises(ConfigError, match="train.monitor_every"):
        config_from_dict(raw)


def _dense_phantom_gradient(model: _TinyModel, x: Tensor, k: int, lam: float, kind: str) -> list:
    """UPG / NPG gradient (eqs. 17 / 18) from the converged h* by explicit vector-Jacobian
    recursions on the cell, independent of the estimators' code: NPG's
    dL/dθ = λ (∂F/∂θ)ᵀ Σ_{j<k} (Bᵀ)ʲ g with B = λ ∂F/∂h + (1 − λ) I at h*; UPG back-propagates
    through k damped steps h ← λF(h) + (1 − λ)h started at h*."""
    cell = model.deq.f
    params = list(cell.parameters())
    z = _fixed_point(model, x)
    if kind == "upg":
        h = z.clone()
        for _ in range(k):
            h = lam * cell(h, x) + (1 - lam) * h
        loss = ((h @ model.readout) ** 2).sum()
        return list(torch.autograd.grad(loss, params))
    zr = z.clone().requires_grad_(True)
    g = torch.autograd.grad(((zr @ model.readout) ** 2).sum(), zr)[0]
    zq = z.clone().requires_grad_(True)
    fz = cell(zq, x)
    acc, v = torch.zeros_like(g), g
    for _ in range(k):
        acc = acc + v
        (jtv,) = torch.autograd.grad(fz, zq, v, retain_graph=True)
        v = lam * jtv + (1 - lam) * v
    return [lam * t for t in torch.autograd.grad(fz, params, acc)]


def test_monitor_compare_measures_other_estimators_against_the_exact_gradient() -> None:
    # Fig. 2 along an IFT-trained run: the model trains with IFT, the monitor also measures
    # UPG(3, 0.6) and NPG(3, 0.6) on the same h*; each cosine must equal the cosine of the dense
    # phantom gradient (eqs. 17 / 18) with the dense exact gradient (eq. 4).
    model = _TinyModel(pdq.IFT(solver=pdq.Broyden(max_iter=60, tol=1e-12)))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mon = GradientMonitor(
        pdq.IFT(solver=pdq.Broyden(max_iter=60, tol=1e-12)),
        compare={"upg": pdq.UPG(k=3, lam=0.6), "npg": pdq.NPG(k=3, lam=0.6)},
    )
    res = mon.measure(model, lambda: model(x))
    assert res["cosine"] == pytest.approx(1.0, abs=1e-9)  # the IFT in use is exact here

    cell = model.deq.f
    z = _fixed_point(model, x)
    zr = z.clone().requires_grad_(True)
    dz = torch.autograd.grad(((zr @ model.readout) ** 2).sum(), zr)[0]
    exact = exact_gradient(cell, z, (x,), list(cell.parameters()), dz)
    for label in ("upg", "npg"):
        dense = _dense_phantom_gradient(model, x, 3, 0.6, label)
        cos, ratio, _, _ = cosine_and_ratio(dense, exact)
        assert res[f"cosine_{label}"] == pytest.approx(cos, abs=1e-10)
        assert res[f"norm_ratio_{label}"] == pytest.approx(ratio, rel=1e-9)
        assert cos < 1.0 - 1e-6  # k = 3 phantom gradients differ measurably from the exact one
    # the model's own estimator is restored
    assert isinstance(model.deq.grad, pdq.IFT)


def test_monitor_compare_rejects_bad_entries() -> None:
    with pytest.raises(TypeError, match="compare"):
        GradientMonitor(compare={"upg": "UPG(5, 0.5)"})
    with pytest.raises(ValueError, match="BPTT"):
        GradientMonitor(compare={"bptt": pdq.BPTT()})
    with pytest.raises(ValueError, match="labels"):
        GradientMonitor(compare={"a b": pdq.UPG(k=2, lam=0.5)})


def test_config_monitor_compare_labels_and_errors() -> None:
    from phantomdeq.train.config import ConfigError, config_from_dict, monitor_label

    cfg = config_from_dict(
        {
            "train": {
                "monitor_every": 5,
                "monitor_compare": [
                    {"name": "upg", "k": 5, "lam": 0.5},
                    {"name": "npg", "k": 5, "lam": 0.5},
                ],
            }
        }
    )
    assert [monitor_label(g) for g in cfg.train.monitor_compare] == [
        "upg_k5_lam0.5",
        "npg_k5_lam0.5",
    ]
    with pytest.raises(ConfigError, match=r"train.monitor_compare\[1\]"):
        config_from_dict(
            {"train": {"monitor_compare": [{"name": "upg", "k": 5}, {"name": "upg", "k": 5}]}}
        )
    with pytest.raises(ConfigError, match=r"train.monitor_compare\[0\].name"):
        config_from_dict({"train": {"monitor_compare": [{"name": "bptt"}]}})
    with pytest.raises(ConfigError, match=r"monitor_compare"):
        config_from_dict({"train": {"monitor_compare": [{"name": "upg", "k": 0}]}})


def test_monitor_compare_shine_reuses_the_forward_broyden_inverse() -> None:
    # SHINE measured beside an IFT-trained run: the monitor's first pass must keep the forward
    # Broyden solve's inverse estimate, so that the compared gradient is, to the bit, the SHINE
    # gradient of a model trained with SHINE at the same forward solve (SHINE itself is checked
    # against its dense formula in test_shine.py), and its cosine is taken against the exact one.
    model = _TinyModel(pdq.IFT(solver=pdq.Broyden(max_iter=60, tol=1e-12)))
    model.deq.solver = pdq.Broyden(max_iter=6, tol=1e-12)  # a short solve: H is far from exact
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mon = GradientMonitor(
        pdq.IFT(solver=pdq.Broyden(max_iter=60, tol=1e-12)), compare={"shine": pdq.SHINE()}
    )
    _, g_exact, _ = mon.gradients(model, lambda: model(x))
    compared = mon.last_compared["shine"]
    assert isinstance(model.deq.grad, pdq.IFT)  # restored

    params = list(model.deq.f.parameters())
    with model.deq.using(grad=pdq.SHINE()):
        direct = list(torch.autograd.grad(model(x), params))
    for a, b in zip(compared, direct):
        assert torch.equal(a, b)
    res = mon.measure(model, lambda: model(x))
    cos, ratio, _, _ = cosine_and_ratio(direct, g_exact)
    assert res["cosine_shine"] == pytest.approx(cos, abs=1e-14)
    assert res["norm_ratio_shine"] == pytest.approx(ratio, rel=1e-12)
    assert cos < 1.0 - 1e-4  # a rank-4 inverse estimate is measurably not the exact inverse


def test_monitor_compare_shine_needs_a_broyden_forward() -> None:
    from phantomdeq.train.config import ConfigError, config_from_dict

    model = _TinyModel(pdq.IFT(solver=pdq.Broyden(max_iter=60, tol=1e-12)))
    x = torch.randn(4, 3, dtype=torch.float64)
    mon = GradientMonitor(compare={"shine": pdq.SHINE()})
    with pytest.raises(ValueError, match=r"compare\['shine'\]=SHINE\(\).*Broyden"):
        mon.measure(model, lambda: model(x))  # the tiny model's forward is FixedPoint
    with pytest.raises(ConfigError, match=r"train.monitor_compare\[0\].name: 'shine'.*broyden"):
        config_from_dict({"train": {"monitor_compare": [{"name": "shine"}]}})
    cfg = config_from_dict(
        {"solver": {"name": "broyden"}, "train": {"monitor_compare": [{"name": "shine"}]}}
    )
    assert cfg.train.monitor_compare[0].name == "shine"
