"""The parts of MDEQ outside the equilibrium layer: MDEQ's convolution initialisation, the stem
(input -> injection) and the classification head (equilibrium state -> logits)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .mdeq_config import MDEQConfig

__all__ = ["Head", "conv", "conv3x3", "make_stem"]

_INIT_STD = 0.01


def conv(cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """Convolution initialised as in MDEQ: weights ~ N(0, 0.01^2), zero bias.

    Every convolution is followed by a normalisation, so the small scale only matters where a
    convolution's output is added to an unnormalised signal -- in the block, ``conv2(...)`` is
    added to the injection, which makes ``F`` close to contractive at initialisation.
    """
    layer = nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=bias)
    nn.init.normal_(layer.weight, mean=0.0, std=_INIT_STD)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A 3x3 :func:`conv` with padding 1."""
    return conv(cin, cout, 3, stride, bias)


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4) with a projection shortcut, used by MDEQ's head."""

    expansion = 4

    def __init__(self, cin: int, planes: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            conv(cin, planes, 1),
            nn.BatchNorm2d(planes),
            nn.ReLU(),
            conv3x3(planes, planes),
            nn.BatchNorm2d(planes),
            nn.ReLU(),
            conv(planes, cout, 1),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential(conv(cin, cout, 1), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Head(nn.Module):
    """MDEQ classification head: per-branch bottlenecks, downsample-and-add, 1x1, pool, linear."""

    def __init__(self, cfg: MDEQConfig, num_classes: int) -> None:
        super().__init__()
        e = Bottleneck.expansion
        self.incre = nn.ModuleList(
            Bottleneck(c, hc) for c, hc in zip(cfg.channels, cfg.head_channels, strict=True)
        )
        self.down = nn.ModuleList(
            nn.Sequential(
                conv3x3(cfg.head_channels[i] * e, cfg.head_channels[i + 1] * e, 2, bias=True),
                nn.BatchNorm2d(cfg.head_channels[i + 1] * e),
                nn.ReLU(),
            )
            for i in range(cfg.num_branches - 1)
        )
        self.final = nn.Sequential(
            conv(cfg.head_channels[-1] * e, cfg.final_channels, 1, bias=True),
            nn.BatchNorm2d(cfg.final_channels),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(cfg.final_channels, num_classes)

    def forward(self, h: Sequence[Tensor]) -> Tensor:
        y = self.incre[0](h[0])
        for i, down in enumerate(self.down):
            y = self.incre[i + 1](h[i + 1]) + down(y)
        y = self.final(y)
        y = y.mean(dim=(-2, -1))
        return self.classifier(y)


def make_stem(cfg: MDEQConfig, in_channels: int) -> nn.Sequential:
    """Two conv3x3-BN-ReLU layers (stride 2 each while ``downsample_times`` allows).

    As in MDEQ, an extra 1x1 conv-BN-ReLU projection is added unless the model is a small
    (<= 2 branch) full-resolution one, where the stem itself is the injection transform.
    """
    c = cfg.channels[0]
    ds = cfg.downsample_times
    layers: list[nn.Module] = [
        conv3x3(in_channels, c, stride=2 if ds >= 1 else 1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        conv3x3(c, c, stride=2 if ds >= 2 else 1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
    ]
    if not (ds == 0 and cfg.num_branches <= 2):
        layers += [conv(c, c, 1), nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(*layers)
