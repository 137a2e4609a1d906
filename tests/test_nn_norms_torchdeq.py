"""Same model after migration (issue 24, item 1): a layer normalised by TorchDEQ 0.1.0's
``apply_norm`` and by ``pdq.nn.apply_norm`` (or ``spectral_norm`` / ``weight_norm`` with
TorchDEQ's options) has the same effective weight and the same gradients for the same
parameters, in float64, through training steps; and applying / removing over a model touches
the same set of modules."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import phantomdeq as pdq

tdq_norm = pytest.importorskip("torchdeq.norm")

D = torch.float64


@pytest.fixture(autouse=True)
def _float64_default() -> Iterator[None]:
    # TorchDEQ creates its learned spectral scale with torch.ones(h) in the default dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 3)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.fc(x).sum() + self.up(self.conv(img)).square().sum()


def _raw(model: nn.Module, layer: str, norm: str, ours: bool) -> dict[str, torch.Tensor]:
    """The trainable tensors of one layer's norm, named alike for both libraries."""
    m = getattr(model, layer)
    if not ours:
        prefix = {"spectral_norm": "weight_orig", "weight_norm": "weight_v"}[norm]
        out = {"w": getattr(m, prefix)}
        if hasattr(m, "weight_g"):
            out["g"] = m.weight_g
        return out
    plist = m.parametrizations.weight
    if norm == "spectral_norm":
        out = {"w": plist.original}
        if plist[0].scale is not None:
            out["g"] = plist[0].scale
        return out
    if hasattr(plist, "original0"):
        return {"g": plist.original0, "w": plist.original1}
    return {"w": plist.original}


def _pair(norm: str, **kw: object) -> tuple[Net, Net]:
    torch.manual_seed(0)
    theirs = Net()
    ours = copy.deepcopy(theirs)
    torch.manual_seed(1)
    tdq_norm.apply_norm(theirs, norm, **kw)
    torch.manual_seed(1)
    pdq.nn.apply_norm(ours, norm, **kw)
    return theirs, ours


OPTIONS = [
    {"learn_scale": True},
    {"learn_scale": False},
    {"learn_scale": True, "target_norm": 0.9, "clip": True, "clip_value": 0.7},
    {"learn_scale": False, "target_norm": 0.5, "clip": True, "clip_value": 2.0},
]


@pytest.mark.parametrize("norm", ["spectral_norm", "weight_norm"])
@pytest.mark.parametrize("kw", OPTIONS, ids=["scale", "fixed", "scale-clip", "fixed-clip"])
def test_effective_weights_and_gradients_match_torchdeq(norm: str, kw: dict) -> None:
    theirs, ours = _pair(norm, **kw)
    gen = torch.Generator().manual_seed(2)
    x, img = torch.randn(3, 6, generator=gen), torch.randn(2, 3, 5, 5, generator=gen)
    for step in range(4):
        training = step < 3
        theirs.train(training)
        ours.train(training)
        tdq_norm.reset_norm(theirs)  # TorchDEQ: power step (training) + recompute, per iteration
        pdq.nn.update_norms(ours)  # what pdq.DEQ does on its cell once per training forward
        for layer in ("fc", "conv", "up"):
            a, b = getattr(theirs, layer).weight, getattr(ours, layer).weight
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (layer, step)
        if not training:
            break
        theirs(x, img).backward()
        ours(x, img).backward()
        with torch.no_grad():
            for layer in ("fc", "conv", "up"):
                ta, tb = _raw(theirs, layer, norm, False), _raw(ours, layer, norm, True)
                assert ta.keys() == tb.keys() == ({"w", "g"} if kw["learn_scale"] else {"w"})
                for key in ta:
                    assert ta[key].shape == tb[key].shape, (layer, key)
                    assert torch.allclose(ta[key].grad, tb[key].grad, rtol=1e-10, atol=1e-12)
                    # one SGD step on both, so the next weights differ from the first ones
                    step_ = 0.01 * ta[key].grad
                    ta[key].sub_(step_)
                    tb[key].sub_(step_)
                    ta[key].grad = tb[key].grad = None


def test_the_learned_spectral_scale_moves_the_norm_away_from_the_target() -> None:
    """The semantic difference the migration guide warns about: with a learned scale, training
    moves ‖W‖₂ away from target_norm (fixed scale: it stays)."""
    for learn, moved in ((True, True), (False, False)):
        torch.manual_seed(0)
        lin = pdq.nn.spectral_norm(nn.Linear(8, 8), lipschitz=0.9, learn_scale=learn, exact=True)
        opt = torch.optim.SGD(lin.parameters(), lr=0.5)
        for _ in range(20):
            opt.zero_grad()
            (-lin(torch.ones(1, 8)).sum()).backward()
            opt.step()
        sigma = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
        assert (abs(sigma - 0.9) > 1e-3) is moved, sigma


class Sub(nn.Linear):
    """A subclass: TorchDEQ matches types exactly, so it is not normalised."""


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Linear(4, 6)
        self.body = nn.Sequential(nn.Conv1d(6, 6, 3), nn.ReLU(), nn.Conv3d(2, 2, 1))
        self.head = nn.ModuleDict({"out": nn.Linear(6, 3), "up": nn.ConvTranspose1d(6, 2, 3)})
        self.sub = Sub(3, 3)
        self.emb = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)


@pytest.mark.parametrize("norm", ["spectral_norm", "weight_norm"])
@pytest.mark.parametrize(
    "filters",
    [{}, {"filter_out": "embedding"}, {"prefix_filter_out": ["head", "body.2"]}],
    ids=["all", "filter_out", "prefix"],
)
def test_apply_and_remove_touch_torchdeqs_set_of_modules(norm: str, filters: dict) -> None:
    torch.manual_seed(0)
    theirs = Model()
    ours = copy.deepcopy(theirs)
    keys = set(theirs.state_dict())
    torch.manual_seed(1)
    tdq_norm.apply_norm(theirs, norm, **filters)
    torch.manual_seed(1)
    done = pdq.nn.apply_norm(ours, norm, **filters)
    expected = [n for n, m in theirs.named_modules() if hasattr(m, "_deq_norm")]
    assert done == expected and expected
    assert [n for n, m in ours.named_modules() if parametrize.is_parametrized(m)] == expected
    ours.train()
    theirs.train()
    tdq_norm.reset_norm(theirs)
    pdq.nn.update_norms(ours)
    tdq_norm.remove_norm(theirs)
    assert pdq.nn.remove_norm(ours) == expected
    assert not any(parametrize.is_parametrized(m) for m in ours.modules())
    assert set(ours.state_dict()) == keys  # back to plain parameters, same names
    for (n, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), n
    assert pdq.nn.apply_norm(ours, "none") == []


def test_apply_norm_options_are_checked() -> None:
    with pytest.raises(ValueError, match="norm_type"):
        pdq.nn.apply_norm(Model(), "batch_norm")
    with pytest.raises(ValueError, match="n_power_iterations"):
        pdq.nn.apply_norm(Model(), "weight_norm", n_power_iterations=3)
    with pytest.raises(TypeError, match="filter_out"):
        pdq.nn.apply_norm(Model(), filter_out=[1])
    with pytest.raises(ValueError, match="clip_value"):
        pdq.nn.apply_norm(Model(), "spectral_norm", clip=True, clip_value=0.0)
    with pytest.raises(ValueError, match="init"):
        pdq.nn.spectral_norm(nn.Linear(3, 3), init="zeros")
    with pytest.raises(ValueError, match="dim"):
        pdq.nn.spectral_norm(nn.Linear(3, 3), dim=2)
    # a custom target table (TorchDEQ's register_norm_module)
    model = Model()
    assert pdq.nn.apply_norm(model, targets={Sub: ("weight", 0)}) == ["sub"]


def test_remove_norm_refuses_a_chain_with_another_parametrization() -> None:
    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    lin = pdq.nn.spectral_norm(nn.Linear(3, 3), lipschitz=0.9)
    parametrize.register_parametrization(lin, "weight", Double())
    with pytest.raises(ValueError, match=r"weight is also parametrized by \['Double'\]"):
        pdq.nn.remove_norm(lin)
    assert parametrize.is_parametrized(lin)
