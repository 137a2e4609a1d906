"""VariationalDropout1d / VariationalDropout3d (issue 24, item 2): one mask per sample and
channel, shared by every position (or voxel) and by every solver iteration of a DEQ call;
TorchDEQ's mask layout for ``token_first=True`` is ``channels_last=True`` here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import phantomdeq as pdq
from phantomdeq.nn import VariationalDropout1d, VariationalDropout3d, reset_variational_dropout

CASES = [
    (VariationalDropout1d, (16, 8, 5), (16, 8, 1), (16, 1, 5)),
    (VariationalDropout3d, (16, 8, 2, 3, 4), (16, 8, 1, 1, 1), (16, 1, 1, 1, 4)),
]


@pytest.mark.parametrize(("cls", "shape", "first", "last"), CASES, ids=["1d", "3d"])
def test_mask_shapes_and_sharing(cls, shape, first, last) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape) + 1.0
    for channels_last, mshape in ((False, first), (True, last)):
        d = cls(0.5, channels_last=channels_last).train()
        mask = d.reset(x, generator=g)
        assert mask is not None and tuple(mask.shape) == mshape
        y = d(x)
        ratio = y / x  # the mask value, broadcast: equal across every position of a channel
        assert torch.equal(ratio, mask.expand_as(x).to(ratio.dtype))
        assert set(torch.unique(mask).tolist()) <= {0.0, 2.0}
    full = cls(0.5, spatial=False).train()
    assert tuple(full.reset(x, generator=g).shape) == shape  # type: ignore[union-attr]


@pytest.mark.parametrize(("cls", "shape", "first", "last"), CASES, ids=["1d", "3d"])
def test_identity_in_eval_reset_required_and_rank_checked(cls, shape, first, last) -> None:
    x = torch.randn(shape)
    d = cls(0.3).eval()
    assert d.reset(x) is None and torch.equal(d(x), x)
    d.train()
    with pytest.raises(RuntimeError, match="call reset"):
        d(x)
    with pytest.raises(ValueError, match=f"{len(shape)}-d shape"):
        d.reset((2, 3))
    d.reset(x)
    with pytest.raises(RuntimeError, match="does not match"):
        d(torch.randn(shape[0] + 1, *shape[1:]))
    with pytest.raises(ValueError, match=f"{cls.__name__}: p must be"):
        cls(1.0)
    with pytest.raises(TypeError, match=f"{cls.__name__}: channels_last must be True or False"):
        cls(0.1, channels_last=1)


def test_drop_rate_and_expectation() -> None:
    p = 0.25
    d = VariationalDropout3d(p).train()
    mask = d.reset((64, 32, 2, 2, 2), generator=torch.Generator().manual_seed(1))
    assert mask is not None
    n = mask.numel()
    assert abs(float((mask == 0).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(mask[mask > 0], torch.tensor(1 / (1 - p)))


def test_one_mask_for_every_solver_iteration() -> None:
    """Inside a DEQ the solve converges to a fixed point of F with the one mask: the output
    satisfies z = F(z) with the mask held, which fails with a fresh mask per call."""
    torch.manual_seed(0)

    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = pdq.nn.spectral_norm(nn.Conv1d(4, 4, 3, padding=1), lipschitz=0.5)
            self.drop = VariationalDropout1d(0.5)

        def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.drop(self.conv(z)) + x)

    cell = Cell().double().train()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    reset_variational_dropout(cell, x, generator=torch.Generator().manual_seed(2))
    deq = pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=200, tol=1e-12), grad=pdq.UPG(k=2))
    z, info = deq(torch.zeros_like(x), x)
    assert bool(info.converged.all())
    with torch.no_grad():
        assert float((cell(z, x) - z).norm() / z.norm()) < 1e-10
        mask = cell.drop.mask.clone()  # type: ignore[union-attr]
        reset_variational_dropout(cell, x, generator=torch.Generator().manual_seed(3))
        assert not torch.equal(mask, cell.drop.mask)  # type: ignore[arg-type]
        assert float((cell(z, x) - z).norm() / z.norm()) > 1e-3


def test_torchdeq_layout_matches_channels_last() -> None:
    tdq = pytest.importorskip("torchdeq.dropout")
    x = torch.randn(4, 5, 6)
    theirs = tdq.VariationalDropout1d(0.5).train()  # token_first=True: [B, L, D]
    theirs(x)
    ours = VariationalDropout1d(0.5, channels_last=True).train()
    assert ours.reset(x).shape == theirs.mask.shape  # type: ignore[union-attr]
    x3 = torch.randn(2, 3, 2, 2, 4)
    theirs3 = tdq.VariationalDropout3d(0.5, token_first=False).train()
    theirs3(x3)
    assert VariationalDropout3d(0.5).train().reset(x3).shape == theirs3.mask.shape  # type: ignore[union-attr]
