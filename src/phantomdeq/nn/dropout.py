"""Variational (locked) dropout for equilibrium models.

A DEQ layer ``F`` is evaluated many times per forward pass (every solver iteration, the
phantom-gradient unrolling of eq. (17), the implicit backward pass of eq. (4)).  For the
fixed point ``h* = F(h*, x)`` of eq. (1) to be well defined, ``F`` must be the *same*
function in each of those evaluations, so ordinary dropout (a fresh mask per call) cannot be
used inside ``F``.  Variational dropout (Gal & Ghahramani, 2016), as used by MDEQ
(Bai et al., 2020), samples one mask per DEQ call -- :meth:`VariationalDropout2d.reset` --
and reuses it until the next reset.  :class:`VariationalDropout1d` (sequences, ``[N, C, L]``)
and :class:`VariationalDropout3d` (volumes, ``[N, C, D, H, W]``) do the same for other ranks
(TorchDEQ's ``VariationalDropout1d``/``3d``; ``channels_last=True`` is its ``token_first=True``
layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from phantomdeq._validate import check_bool, check_float

__all__ = [
    "VariationalDropout1d",
    "VariationalDropout2d",
    "VariationalDropout3d",
    "reset_variational_dropout",
]


class VariationalDropout2d(nn.Module):
    """Dropout whose mask is sampled by :meth:`reset` and reused until the next reset.

    Args:
        p: drop probability, in ``[0, 1)``.
        spatial: if True (MDEQ's default) one mask value per (sample, channel) is shared by all
            pixels, i.e. the mask has shape ``[N, C, 1, 1]``; if False every element has its
            own mask value (mask shape ``[N, C, H, W]``).

    In ``eval()`` mode, or when ``p == 0``, the module is the identity.  In ``train()`` mode
    with ``p > 0``, calling it before :meth:`reset` raises ``RuntimeError``.  The mask is
    scaled by ``1 / (1 - p)`` so that the expected activation is unchanged.
    """

    def __init__(self, p: float = 0.0, *, spatial: bool = True) -> None:
        super().__init__()
        self.p = check_float(
            "p", p, owner="VariationalDropout2d", low=0.0, high=1.0, high_open=True
        )
        self.spatial = check_bool("spatial", spatial, owner="VariationalDropout2d")
        self.mask: Tensor | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, spatial={self.spatial}"

    def reset(
        self,
        like: Tensor | Sequence[int] | torch.Size,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor | None:
        """Sample a new mask for activations shaped like ``like`` (a tensor or a shape).

        Returns the mask, or None (mask cleared) when the module is in eval mode or ``p == 0``.
        With a tensor, its device and dtype are used unless given explicitly.
        """
        if isinstance(like, Tensor):
            shape = tuple(like.shape)
            device = like.device if device is None else device
            dtype = like.dtype if dtype is None else dtype
        else:
            shape = tuple(int(s) for s in like)
        if len(shape) != 4:
            raise ValueError(
                f"VariationalDropout2d.reset: expected a 4-d shape [N, C, H, W], got {shape}"
            )
        if not self.training or self.p == 0.0:
            self.mask = None
            return None
        if dtype is None or not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        mshape = (shape[0], shape[1], 1, 1) if self.spatial else shape
        gen_device = generator.device if generator is not None else device
        keep = torch.rand(mshape, generator=generator, device=gen_device) >= self.p
        mask = keep.to(device=device, dtype=dtype) / (1.0 - self.p)
        self.mask = mask
        return mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None:
            raise RuntimeError(
                "VariationalDropout2d: call reset(x) before the forward pass in train() mode "
                "(the mask is sampled once per DEQ call and reused by every solver step)"
            )
        if self.mask.shape[0] != x.shape[0] or self.mask.shape[1] != x.shape[1]:
            raise RuntimeError(
                f"VariationalDropout2d: mask of shape {tuple(self.mask.shape)} does not match "
                f"input of shape {tuple(x.shape)}; call reset() with the current batch"
            )
        return x * self.mask


class _VariationalDropoutNd(nn.Module):
    """Variational dropout for activations ``[N, C, *S]`` with ``len(S) == _SPATIAL``
    (``channels_last=True``: ``[N, *S, C]``); the mask is sampled by :meth:`reset` and reused
    until the next reset."""

    _SPATIAL = 1
    _LAYOUT = ("[N, C, L]", "[N, L, C]")

    def __init__(self, p: float = 0.0, *, spatial: bool = True, channels_last: bool = False):
        super().__init__()
        owner = type(self).__name__
        self.p = check_float("p", p, owner=owner, low=0.0, high=1.0, high_open=True)
        self.spatial = check_bool("spatial", spatial, owner=owner)
        self.channels_last = check_bool("channels_last", channels_last, owner=owner)
        self.mask: Tensor | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, spatial={self.spatial}, channels_last={self.channels_last}"

    def _mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self.spatial:
            return shape
        ones = (1,) * self._SPATIAL
        if self.channels_last:
            return (shape[0], *ones, shape[-1])
        return (shape[0], shape[1], *ones)

    def reset(
        self,
        like: Tensor | Sequence[int] | torch.Size,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor | None:
        """Sample a new mask for activations shaped like ``like`` (a tensor or a shape).

        With ``spatial=True`` one value per (sample, channel) is shared by every position; with
        ``spatial=False`` every element has its own. Returns the mask, or None (mask cleared)
        in eval mode or with ``p == 0``. With a tensor, its device and dtype are used unless
        given explicitly.
        """
        name = type(self).__name__
        if isinstance(like, Tensor):
            shape = tuple(like.shape)
            device = like.device if device is None else device
            dtype = like.dtype if dtype is None else dtype
        else:
            shape = tuple(int(s) for s in like)
        if len(shape) != self._SPATIAL + 2:
            layout = self._LAYOUT[int(self.channels_last)]
            raise ValueError(
                f"{name}.reset: expected a {self._SPATIAL + 2}-d shape {layout}, got {shape}"
            )
        if not self.training or self.p == 0.0:
            self.mask = None
            return None
        if dtype is None or not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        gen_device = generator.device if generator is not None else device
        keep = torch.rand(self._mask_shape(shape), generator=generator, device=gen_device) >= self.p
        self.mask = keep.to(device=device, dtype=dtype) / (1.0 - self.p)
        return self.mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        name = type(self).__name__
        if self.mask is None:
            raise RuntimeError(
                f"{name}: call reset(x) before the forward pass in train() mode "
                "(the mask is sampled once per DEQ call and reused by every solver step)"
            )
        if x.dim() != self.mask.dim() or self._mask_shape(tuple(x.shape)) != tuple(self.mask.shape):
            raise RuntimeError(
                f"{name}: mask of shape {tuple(self.mask.shape)} does not match input of shape "
                f"{tuple(x.shape)}; call reset() with the current batch"
            )
        return x * self.mask


class VariationalDropout1d(_VariationalDropoutNd):
    """Variational dropout for sequences ``[N, C, L]`` (``channels_last=True``: ``[N, L, C]``,
    TorchDEQ's ``token_first=True``): the mask is sampled by :meth:`reset` and reused until the
    next reset, so every solver iteration of one DEQ call sees the same mask.

    Args:
        p: drop probability, in ``[0, 1)``.
        spatial: if True, one mask value per (sample, channel) is shared by all positions (mask
            ``[N, C, 1]``); if False every element has its own.
        channels_last: the channel (feature) dimension is last instead of second.

    In ``eval()`` mode, or when ``p == 0``, the module is the identity.  In ``train()`` mode
    with ``p > 0``, calling it before :meth:`reset` raises ``RuntimeError``.  The mask is
    scaled by ``1 / (1 - p)`` so that the expected activation is unchanged.
    """

    _SPATIAL = 1
    _LAYOUT = ("[N, C, L]", "[N, L, C]")


class VariationalDropout3d(_VariationalDropoutNd):
    """Variational dropout for volumes ``[N, C, D, H, W]`` (``channels_last=True``:
    ``[N, D, H, W, C]``, TorchDEQ's ``token_first=True``); otherwise as
    :class:`VariationalDropout1d` (with ``spatial=True`` the mask is ``[N, C, 1, 1, 1]``, one
    value per sample and channel shared by the whole volume)."""

    _SPATIAL = 3
    _LAYOUT = ("[N, C, D, H, W]", "[N, D, H, W, C]")


def reset_variational_dropout(
    module: nn.Module,
    like: Tensor | Sequence[int] | torch.Size,
    *,
    generator: torch.Generator | None = None,
) -> None:
    """Reset every :class:`VariationalDropout2d` (and :class:`VariationalDropout1d` /
    :class:`VariationalDropout3d`) inside ``module`` for activations like ``like``; a module
    whose dropouts expect different ranks needs a ``reset`` per dropout."""
    for m in module.modules():
        if isinstance(m, VariationalDropout2d | _VariationalDropoutNd):
            m.reset(like, generator=generator)
