"""``Correction(mode="sliced")``: TorchDEQ's ``DEQSliced`` (DEQ-Flow's segmented solve) equals a
hand-written segmented loop (same states, same gradients, float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import phantomdeq as pdq
from phantomdeq.grad import Correction, corrected_loss


class Cell(nn.Module):
    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.mul_(0.4)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


def _loss(s: torch.Tensor) -> torch.Tensor:
    return (s**2).sum()


@pytest.mark.parametrize(("states", "k", "lam"), [(3, 2, 0.5), (2, 1, 1.0)])
def test_sliced_equals_a_hand_written_segmented_loop(states: int, k: int, lam: float) -> None:
    """Segments of ``max_iter // N`` evaluations of a fixed budget (``tol=0``: the solve
    returns its last iterate for this contraction, ``g`` applied ``T − 1`` times), UPG(k, λ)
    from each detached segment result, the next segment from that state's value, detached."""
    torch.manual_seed(0)
    cell = Cell()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    max_iter, gamma = 9, 0.7
    deq = pdq.DEQ(
        cell,
        solver=pdq.FixedPoint(max_iter=max_iter, tol=0.0),
        grad=pdq.grad.UPG(k=k, lam=lam),
        correction=Correction(states=states, gamma=gamma, mode="sliced"),
    )
    z, info = deq(torch.zeros_like(x), x)
    assert info.states is not None and len(info.states) == states and info.states[-1] is z
    assert info.state_weights == [gamma ** (states - 1 - m) for m in range(states)]
    loss = corrected_loss(_loss, info.states, info.state_weights)
    ours = torch.autograd.grad(loss, [*cell.parameters(), x])

    seg = max_iter // states
    start = torch.zeros_like(x)
    hand = []
    for _ in range(states):
        with torch.no_grad():
            h = start.detach()
            for _ in range(seg - 1):
                h = cell(h, x)
        for _ in range(k):
            h = lam * cell(h, x) + (1 - lam) * h
        hand.append(h)
        start = h.detach()
    ref_loss = sum(w * _loss(s) for w, s in zip(info.state_weights, hand))
    ref = torch.autograd.grad(ref_loss, [*cell.parameters(), x])
    for a, b in zip(info.states, hand):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


def test_sliced_refusals_name_the_setting() -> None:
    with pytest.raises(ValueError, match=r"Correction: mode must be one of"):
        Correction(states=2, mode="segments")
    with pytest.raises(ValueError, match=r"solver\.max_iter=5 gives 1: raise max_iter to 10"):
        pdq.DEQ(
            Cell(),
            solver=pdq.FixedPoint(max_iter=5),
            grad=pdq.grad.UPG(k=1),
            correction=Correction(states=5, mode="sliced"),
        )
    assert repr(Correction(states=2, mode="sliced")) == (
        "Correction(states=2, gamma=0.8, mode='sliced')"
    )


def test_eval_mode_is_one_full_solve() -> None:
    """Without a gradient the sliced DEQ solves once with the whole budget (TorchDEQ's
    inference path)."""
    torch.manual_seed(0)
    cell, x = Cell(), torch.randn(2, 5, dtype=torch.float64)
    kw = {"solver": pdq.FixedPoint(max_iter=9, tol=0.0), "grad": pdq.grad.UPG(k=2)}
    a = pdq.DEQ(cell, correction=Correction(states=3, mode="sliced"), **kw).eval()
    b = pdq.DEQ(cell, **kw).eval()
    with torch.no_grad():
        za, ia = a(torch.zeros_like(x), x)
        zb, _ = b(torch.zeros_like(x), x)
    assert torch.equal(za, zb) and ia.states is None


def test_sliced_equals_torchdeq_deqsliced() -> None:
    """The same gradients as TorchDEQ 0.1.0's ``core="sliced"`` on the same weights (float64).
    TorchDEQ's ``fixed_point_iter`` returns its last output ``g^m(z)``, a ``FixedPoint``
    the input of its last evaluation: segments of ``m + 1`` evaluations here match TorchDEQ's
    ``m``, i.e. ``max_iter = f_max_iter + n_states``."""
    torchdeq = pytest.importorskip("torchdeq")
    torch.manual_seed(1)
    cell = Cell()
    x = torch.randn(4, 5, dtype=torch.float64)
    n, f_max_iter, k, tau, gamma = 3, 9, 2, 0.5, 0.7
    ref = torchdeq.get_deq(
        core="sliced",
        f_solver="fixed_point_iter",
        f_max_iter=f_max_iter,
        f_tol=1e-300,
        n_states=n,
        grad=k,
        tau=tau,
    )
    ref.train()
    ref_states, _ = ref(lambda z: cell(z, x), torch.zeros_like(x))
    weights = [gamma ** (n - 1 - m) for m in range(n)]
    ref_grads = torch.autograd.grad(
        sum(w * _loss(s) for w, s in zip(weights, ref_states)), list(cell.parameters())
    )
    deq = pdq.DEQ(
        cell,
        solver=pdq.FixedPoint(max_iter=f_max_iter + n, tol=0.0),
        grad=pdq.grad.UPG(k=k, lam=tau),
        correction=Correction(states=n, gamma=gamma, mode="sliced"),
    )
    _, info = deq(torch.zeros_like(x), x)
    assert info.states is not None and info.state_weights == weights
    grads = torch.autograd.grad(
        corrected_loss(_loss, info.states, info.state_weights), list(cell.parameters())
    )
    for a, b in zip(info.states, ref_states):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


def test_the_sliced_mode_is_a_config_key() -> None:
    """``grad.correction.mode: sliced`` reaches :class:`Correction`; a wrong mode names the
    key and the allowed values."""
    pytest.importorskip("pydantic")
    from conftest import tiny_config
    from phantomdeq.train.build import build_correction
    from phantomdeq.train.config import ConfigError, config_from_dict

    raw = tiny_config(grad={"name": "upg", "k": 2, "lam": 0.5})
    raw["grad"]["correction"] = {"states": 2, "mode": "sliced"}
    corr = build_correction(config_from_dict(raw).grad)
    assert corr is not None and corr.mode == "sliced" and corr.states == 2
    raw["grad"]["correction"]["mode"] = "segments"
    with pytest.raises(ConfigError, match=r"grad\.correction\.mode.*sampled.*sliced"):
        config_from_dict(raw)
