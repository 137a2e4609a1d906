"""MDEQ: configurations, shapes, tuple state, shared dropout masks, pretraining mode, training."""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F

import phantomdeq as pdq
from phantomdeq.models import MDEQ, MDEQConfig, MDEQOutput, build_model, mdeq_config
from phantomdeq.models.mdeq import MDEQCell, with_overrides


def _small_cfg(**kw: object) -> MDEQConfig:
    """A narrow MDEQ (same structure as MDEQ-Tiny) that is fast enough for unit tests."""
    base = dict(
        name="test_small",
        channels=(8, 8),
        head_channels=(4, 8),
        final_channels=32,
        expansion=2,
        num_groups=4,
        dropout=0.0,
    )
    base.update(kw)
    return MDEQConfig(**base)  # type: ignore[arg-type]


def _model(
    cfg: MDEQConfig, grad: pdq.GradientEstimator | None = None, in_channels: int = 1, **kw: object
) -> MDEQ:
    return MDEQ(
        cfg,
        num_classes=10,
        in_channels=in_channels,
        solver=pdq.Anderson(max_iter=kw.pop("max_iter", 12), tol=1e-5),  # type: ignore[arg-type]
        grad=grad if grad is not None else pdq.UPG(k=3, lam=0.5),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("name", "classes", "target"),
    [("mdeq_tiny", 10, 170e3), ("mdeq_cifar10m", 10, 10e6), ("mdeq_imagenet18m", 1000, 18e6)],
)
def test_parameter_counts_match_paper(name: str, classes: int, target: float) -> None:
    model = build_model(
        name,
        num_classes=classes,
        in_channels=3,
        solver=pdq.FixedPoint(max_iter=2),
        grad=pdq.OneStep(),
    )
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - target) / target < 0.15, f"{name}: {n} parameters, paper says {target:.0f}"


def test_config_lookup_and_validation() -> None:
    with pytest.raises(ValueError, match="mdeq_tiny, mdeq_cifar10m, mdeq_imagenet18m"):
        mdeq_config("mdeq_huge")
    with pytest.raises(ValueError, match="mdeq_tiny"):
        build_model(
            "resnet", num_classes=10, in_channels=3, solver=pdq.FixedPoint(), grad=pdq.OneStep()
        )
    with pytest.raises(ValueError, match="head_channels"):
        _small_cfg(head_channels=(4,))
    with pytest.raises(ValueError, match="divisible by num_groups"):
        _small_cfg(channels=(6, 8))
    with pytest.raises(ValueError, match="dropout"):
        with_overrides(mdeq_config("mdeq_tiny"), dropout=1.0)
    assert (
        mdeq_config("mdeq_tiny").dropout == 0.25 and mdeq_config("mdeq_imagenet18m").dropout == 0.0
    )


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: _small_cfg(channels=[8, 8]), "MDEQConfig.channels must be a non-empty tuple"),
        (lambda: _small_cfg(channels=(8, 8.0)), "MDEQConfig.channels must be a non-empty tuple"),
        (lambda: _small_cfg(num_blocks=1.0), "MDEQConfig: num_blocks must be an integer"),
        (lambda: _small_cfg(dropout="0.1"), "MDEQConfig: dropout must be a finite number"),
        (lambda: _small_cfg(weight_norm=1), "MDEQConfig: weight_norm must be True or False"),
        (lambda: _small_cfg(upsample_mode=None), "MDEQConfig: upsample_mode must be one of"),
        (
            lambda: build_model(
                3, num_classes=10, in_channels=3, solver=pdq.FixedPoint(), grad=pdq.OneStep()
            ),
            "build_model: name must be a str",
        ),
        (
            lambda: MDEQ(
                _small_cfg(),
                num_classes="10",
                in_channels=1,
                solver=pdq.FixedPoint(),
                grad=pdq.OneStep(),
            ),
            "MDEQ: num_classes must be an integer",
        ),
        (
            lambda: MDEQ(
                _small_cfg(), num_classes=10, in_channels=1, solver="fp", grad=pdq.OneStep()
            ),
            "DEQ: solver must be a solver",
        ),
    ],
)
def test_wrong_types_are_type_errors(make, message) -> None:
    with pytest.raises(TypeError) as err:
        make()
    assert message in str(err.value)


def test_tiny_forward_shapes_on_cifar_sized_input() -> None:
    torch.manual_seed(0)
    model = build_model(
        "mdeq_tiny", num_classes=10, in_channels=3, solver=pdq.Anderson(max_iter=3, tol=1e-3),
        grad=pdq.UPG(k=2, lam=0.5),
    ).eval()  # fmt: skip
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, MDEQOutput)
    assert out.logits.shape == (2, 10) and out.jac_loss is None
    assert isinstance(out.info, pdq.Solution)
    assert isinstance(out.state, tuple)
    assert [tuple(t.shape) for t in out.state] == [(2, 24, 32, 32), (2, 24, 16, 16)]


def test_imagenet_stem_downsamples_by_four() -> None:
    cfg = _small_cfg(channels=(8, 8, 8, 8), head_channels=(2, 2, 2, 2), downsample_times=2)
    model = _model(cfg, in_channels=3, max_iter=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert [tuple(t.shape[-2:]) for t in out.state] == [(8, 8), (4, 4), (2, 2), (1, 1)]


def test_odd_resolutions_and_fixed_point_residual_on_tuple_state() -> None:
    # 28 -> 14 -> 7 -> 4: the fusion must resample to each branch's exact size.
    torch.manual_seed(1)
    cfg = _small_cfg(channels=(8, 8, 8), head_channels=(2, 2, 2))
    model = _model(cfg, max_iter=20).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        assert [tuple(t.shape[-2:]) for t in out.state] == [(28, 28), (14, 14), (7, 7)]
        # the reported per-sample relative residual is ||F(h) - h|| / ||h|| over the whole tuple
        fh = model.f(out.state, model.stem(x))
        num = sum((a - b).flatten(1).pow(2).sum(1) for a, b in zip(fh, out.state))
        den = sum(b.flatten(1).pow(2).sum(1) for b in out.state)
        rel = num.sqrt() / den.sqrt()
    assert torch.allclose(rel, out.info.rel_residual.to(rel.dtype), rtol=1e-3, atol=1e-6)
    # an untrained MDEQ is only approximately solvable (paper Sec. 3: hence the pretraining)
    assert float(rel.max()) < 1.0


def test_cell_is_shared_and_state_dict_round_trips() -> None:
    torch.manual_seed(2)
    a = _model(_small_cfg())
    assert a.f is a.deq.f and isinstance(a.f, MDEQCell)
    keys = list(a.state_dict())
    assert len(keys) == len(set(keys)) and not any(k.startswith("f.") for k in keys)
    b = _model(_small_cfg())
    b.load_state_dict(a.state_dict())
    c = copy.deepcopy(a)
    x = torch.randn(2, 1, 8, 8)
    a.eval(), b.eval(), c.eval()
    with torch.no_grad():
        la, lb, lc = a(x).logits, b(x).logits, c(x).logits
    assert torch.allclose(la, lb) and torch.allclose(la, lc)
    assert c.f is c.deq.f and c.f is not a.f


def test_dropout_mask_is_shared_by_all_solver_steps() -> None:
    torch.manual_seed(3)
    model = _model(_small_cfg(dropout=0.5)).train()
    x = torch.randn(4, 1, 8, 8)
    inj = model.stem(x)
    z0 = model.initial_state(inj)
    model.f.reset(z0)
    h = tuple(torch.randn_like(t) for t in z0)
    with torch.no_grad():
        y1, y2 = model.f(h, inj), model.f(h, inj)
        assert all(torch.equal(a, b) for a, b in zip(y1, y2))  # same mask, same F
        model.f.reset(z0)
        y3 = model.f(h, inj)
    assert not all(torch.equal(a, b) for a, b in zip(y1, y3))  # new call, new mask

    # inside one model call, every F evaluation (solver + UPG unrolling) sees one mask per block
    seen: list[torch.Tensor] = []

    def hook(mod: torch.nn.Module, args: tuple) -> None:
        seen.append(cast(torch.Tensor, mod.mask))

    drops = [b.drop for i in range(2) for b in model.f.blocks(i)]
    handles = [d.register_forward_pre_hook(hook) for d in drops]
    model(x)
    first = list(seen)
    seen.clear()
    model(x)
    for h_ in handles:
        h_.remove()
    assert len(first) > 2 * len(drops)  # many F evaluations
    masks0 = {id(m) for m in first[0::2]}, {id(m) for m in first[1::2]}
    assert masks0 == ({id(first[0])}, {id(first[1])})
    assert not torch.equal(seen[0], first[0])


def test_unrolled_mode_backprops_to_every_parameter() -> None:
    torch.manual_seed(4)
    model = _model(_small_cfg(dropout=0.2)).train()
    out = model(torch.randn(4, 1, 8, 8), mode="unrolled", unrolled_steps=3)
    assert out.info is None
    F.cross_entropy(out.logits, torch.arange(4)).backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []
    with pytest.raises(ValueError, match="unrolled_steps"):
        model(torch.randn(2, 1, 8, 8), mode="unrolled")
    with pytest.raises(ValueError, match="mode"):
        model(torch.randn(2, 1, 8, 8), mode="bptt")


def test_jacobian_regulariser_is_a_differentiable_positive_scalar() -> None:
    torch.manual_seed(5)
    model = _model(_small_cfg()).train()
    out = model(torch.randn(4, 1, 8, 8), jac_reg=True)
    assert out.jac_loss is not None and out.jac_loss.dim() == 0 and out.jac_loss.item() > 0
    (out.logits.sum() * 0 + out.jac_loss).backward()
    conv1: Any = model.f.blocks(0)[0].conv1
    assert conv1.parametrizations.weight.original1.grad is not None
    model.eval()
    with torch.no_grad():
        ev = model(torch.randn(4, 1, 8, 8), jac_reg=True)
    assert ev.jac_loss is not None and not ev.jac_loss.requires_grad


@pytest.mark.slow
@pytest.mark.filterwarnings(
    "ignore:IFT backward solve did not reach:RuntimeWarning"
)  # loose IFT budget: intended
@pytest.mark.parametrize(
    "grad",
    [pdq.UPG(k=3, lam=0.5), pdq.IFT(solver=pdq.FixedPoint(max_iter=10, tol=1e-5))],
    ids=["upg", "ift"],
)
def test_a_few_steps_on_digits_lower_the_loss(grad: pdq.GradientEstimator) -> None:
    from phantomdeq.data import load_dataset

    torch.manual_seed(0)
    train, _, info = load_dataset("digits", None, train_size=32)
    x, y = train.normalize(train.images[:32]), train.labels[:32]
    model = _model(_small_cfg(), grad=grad, in_channels=info.in_channels, max_iter=8).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_now() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x).logits, y))

    before = loss_now()
    for _ in range(5):
        loss = F.cross_entropy(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_now()
    assert after < before - 0.1, (before, after)
