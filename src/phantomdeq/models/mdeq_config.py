"""Configurations of the multiscale DEQ (:mod:`.mdeq`): the :class:`MDEQConfig` record, the
named configurations of the paper (MDEQ-Tiny for the ablations, the 10M CIFAR-10 and 18M
ImageNet models of Table 3) and :func:`with_overrides`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from phantomdeq._validate import check_bool, check_choice, check_float, check_int

__all__ = ["MDEQ_CONFIG_NAMES", "MDEQConfig", "mdeq_config", "with_overrides"]

_UPSAMPLE_MODES = ("nearest", "bilinear")


@dataclass(frozen=True)
class MDEQConfig:
    """Architecture hyper-parameters of an MDEQ (validated on construction).

    Attributes:
        name: label of the configuration.
        channels: channels of each branch (one entry per branch; branch ``i`` runs at
            ``1/2**i`` of the stem's output resolution).
        num_blocks: residual BASIC blocks per branch inside ``F``.
        expansion: width multiplier of the first convolution of each block.
        num_groups: GroupNorm groups (the post-fusion norm uses ``num_groups // 2``).
        head_channels: bottleneck width of the head per branch (outputs ``4x`` as many channels).
        final_channels: channels of the last 1x1 convolution before pooling.
        dropout: variational dropout rate inside ``F`` (one mask per DEQ call).
        downsample_times: stride-2 convolutions in the stem (0 for CIFAR, 2 for ImageNet).
        weight_norm: weight-normalise the convolutions of ``F`` (blocks and post-fusion).
        upsample_mode: interpolation used by the fusion when going up in resolution.
        spatial_dropout: share the dropout mask across pixels (mask shape ``[N, C, 1, 1]``).
    """

    name: str
    channels: tuple[int, ...]
    head_channels: tuple[int, ...]
    final_channels: int
    num_blocks: int = 1
    expansion: int = 5
    num_groups: int = 8
    dropout: float = 0.0
    downsample_times: int = 0
    weight_norm: bool = True
    upsample_mode: str = "nearest"
    spatial_dropout: bool = True

    def __post_init__(self) -> None:
        owner = "MDEQConfig"

        def _positive_ints(field: str, value: object) -> None:
            if not isinstance(value, tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            ):
                raise TypeError(
                    f"MDEQConfig.{field} must be a non-empty tuple of positive ints, got {value!r}"
                )
            if len(value) == 0 or not all(v > 0 for v in value):
                raise ValueError(
                    f"MDEQConfig.{field} must be a non-empty tuple of positive ints, got {value!r}"
                )

        if not isinstance(self.name, str):
            raise TypeError(f"MDEQConfig.name must be a str, got {type(self.name).__name__}")
        _positive_ints("channels", self.channels)
        _positive_ints("head_channels", self.head_channels)
        if len(self.head_channels) != len(self.channels):
            raise ValueError(
                f"MDEQConfig.head_channels must have one entry per branch "
                f"({len(self.channels)}), got {len(self.head_channels)}"
            )
        for field in ("final_channels", "num_blocks", "expansion", "num_groups"):
            check_int(field, getattr(self, field), minimum=1, owner=owner)
        if self.num_groups < 2 or self.num_groups % 2:
            raise ValueError(
                f"MDEQConfig.num_groups must be an even int >= 2 (post-fusion GroupNorm uses "
                f"num_groups // 2), got {self.num_groups}"
            )
        for c in self.channels:
            if c % self.num_groups or (c * self.expansion) % self.num_groups:
                raise ValueError(
                    f"MDEQConfig.channels: every entry (and entry * expansion) must be divisible "
                    f"by num_groups={self.num_groups}, got channels={self.channels}"
                )
        check_float("dropout", self.dropout, owner=owner, low=0.0, high=1.0, high_open=True)
        check_int("downsample_times", self.downsample_times, minimum=0, owner=owner)
        if self.downsample_times not in (0, 1, 2):
            raise ValueError(
                f"MDEQConfig.downsample_times must be 0, 1 or 2, got {self.downsample_times!r}"
            )
        check_bool("weight_norm", self.weight_norm, owner=owner)
        check_choice("upsample_mode", self.upsample_mode, _UPSAMPLE_MODES, owner=owner)
        check_bool("spatial_dropout", self.spatial_dropout, owner=owner)

    @property
    def num_branches(self) -> int:
        return len(self.channels)


_CONFIGS: dict[str, MDEQConfig] = {
    # MDEQ-Tiny, the paper's ablation backbone (Sec. 3, "170K parameters"); ~159K here.
    "mdeq_tiny": MDEQConfig(
        name="mdeq_tiny",
        channels=(24, 24),
        head_channels=(8, 16),
        final_channels=200,
        num_blocks=1,
        expansion=5,
        num_groups=8,
        dropout=0.25,
    ),
    # MDEQ for the large-scale CIFAR-10 experiment (Table 3, "10M").  MDEQ-Large's branches and
    # expansion; the head is slimmed (head 12..96, final 1024) to land at ~10.3M parameters.
    "mdeq_cifar10m": MDEQConfig(
        name="mdeq_cifar10m",
        channels=(32, 64, 128, 256),
        head_channels=(12, 24, 48, 96),
        final_channels=1024,
        num_blocks=1,
        expansion=5,
        num_groups=8,
        dropout=0.3,
    ),
    # MDEQ for ImageNet (Table 3, "18M"); stride-4 stem; ~18.6M parameters at 1000 classes.
    "mdeq_imagenet18m": MDEQConfig(
        name="mdeq_imagenet18m",
        channels=(32, 64, 128, 256),
        head_channels=(28, 56, 112, 224),
        final_channels=2048,
        num_blocks=1,
        expansion=5,
        num_groups=8,
        dropout=0.0,
        downsample_times=2,
    ),
}

MDEQ_CONFIG_NAMES: tuple[str, ...] = tuple(_CONFIGS)
"""The names :func:`mdeq_config` and ``phantomdeq.models.build_model`` accept."""


def mdeq_config(name: str) -> MDEQConfig:
    """Return the named MDEQ configuration (``mdeq_tiny``, ``mdeq_cifar10m``, ``mdeq_imagenet18m``)."""
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"mdeq_config: unknown name {name!r}; allowed names: {', '.join(MDEQ_CONFIG_NAMES)}"
        ) from None


def with_overrides(cfg: MDEQConfig, **changes: object) -> MDEQConfig:
    """Copy of ``cfg`` with some fields replaced (validated again)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(MDEQConfig)}
    if unknown:
        raise ValueError(
            f"with_overrides: unknown MDEQConfig field(s) {sorted(unknown)}; allowed: "
            f"{[f.name for f in dataclasses.fields(MDEQConfig)]}"
        )
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
