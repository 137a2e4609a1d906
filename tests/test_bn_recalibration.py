"""Precise BatchNorm before evaluation: the running statistics become the exact statistics of
the eval-mode activations, and training is unaffected."""

from __future__ import annotations

import torch
from torch import nn

from phantomdeq.train.data import recalibrate_batchnorm


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.conv(x)
        self.seen = h.detach()
        return self.drop(self.bn(h))


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = 3.0 + 2.0 * torch.randn(n, 1, 5, 5, generator=g)
        self.labels = torch.zeros(n, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_running_statistics_equal_the_eval_mode_batch_statistics():
    torch.manual_seed(0)
    net = _Net().double()
    data = _Data(48)
    net.train()
    used = recalibrate_batchnorm(net, data, batches=3, batch_size=16)
    assert used == 3
    assert net.training and net.bn.training and net.drop.training  # modes restored
    assert net.bn.momentum == 0.1
    with torch.no_grad():
        h = net.conv(data.images.double())
    mean = h.mean(dim=(0, 2, 3))
    # per-batch unbiased variances, averaged (what a cumulative BatchNorm average computes)
    var = torch.stack([h[i : i + 16].var(dim=(0, 2, 3), unbiased=True) for i in (0, 16, 32)]).mean(
        0
    )
    assert torch.allclose(net.bn.running_mean, mean, atol=1e-10)
    assert torch.allclose(net.bn.running_var, var, atol=1e-10)
    assert int(net.bn.num_batches_tracked) == 3


def test_no_batchnorm_or_zero_batches_is_a_no_op():
    net = nn.Sequential(nn.Conv2d(1, 2, 3))
    assert recalibrate_batchnorm(net, _Data(8), batches=2, batch_size=4) == 0
    bn_net = _Net()
    before = bn_net.bn.running_mean.clone()
    assert recalibrate_batchnorm(bn_net, _Data(8), batches=0, batch_size=4) == 0
    assert torch.equal(bn_net.bn.running_mean, before)
