"""Variational (locked) dropout for equilibrium models.

A DEQ layer ``F`` is evaluated many times per forward pass (every solver iteration, the
phantom-gradient unrolling of eq. (17), the implicit backward pass of eq. (4)).  For the
fixed point ``h* = F(h*, x)`` of eq. (1) to be well defined, ``F`` must be the *same*
function in each of those evaluations, so ordinary dropout (a fresh mask per call) cannot be
used inside ``F``.  Variational dropout (Gal & Ghahramani, 2016), as used by MDEQ
(Bai et al., 2020), samples one mask per DEQ call -- :meth:`VariationalDropout2d.reset` --
and reuses it until the next reset. :class:`VariationalDropout1d` is the same for sequences
``[N, L, C]`` (one mask per sequence and feature, shared by every position).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from phantomdeq._validate import check_bool, check_float

__all__ = ["VariationalDropout1d", "VariationalDropout2d", "reset_variational_dropout"]


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


def reset_variational_dropout(
    module: nn.Module,
    like: Tensor | Sequence[int] | torch.Size,
    *,
    generator: torch.Generator | None = None,
) -> None:
    """Reset every :class:`VariationalDropout2d` inside ``module`` for activations like ``like``."""
    for m in module.modules():
        if isinstance(m, VariationalDropout2d):
            m.reset(like, generator=generator)


class VariationalDropout1d(nn.Module):
    """Dropout for sequences ``[N, L, C]`` whose mask is sampled by :meth:`reset` and reused
    until the next reset: one mask value per (sequence, feature), shared by every position
    (mask shape ``[N, 1, C]``) and by every evaluation of a DEQ cell in one solve.

    Args:
        p: drop probability, in ``[0, 1)``.

    Sharing the mask across positions keeps a causal cell causal (position ``t``'s output never
    depends on a later position's mask draw). In ``eval()`` mode, or when ``p == 0``, the module
    is the identity; in ``train()`` mode with ``p > 0``, calling it before :meth:`reset` raises
    ``RuntimeError``. The mask is scaled by ``1 / (1 - p)``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = check_float(
            "p", p, owner="VariationalDropout1d", low=0.0, high=1.0, high_open=True
        )
        self.mask: Tensor | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def reset(
        self,
        like: Tensor | Sequence[int] | torch.Size,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor | None:
        """Sample a new mask for sequences shaped like ``like`` (``[N, L, C]``, a tensor or a
        shape). Returns the mask ``[N, 1, C]``, or None (mask cleared) in eval mode or with
        ``p == 0``. With a tensor, its device and dtype are used unless given explicitly."""
        if isinstance(like, Tensor):
            shape = tuple(like.shape)
            device = like.device if device is None else device
            dtype = like.dtype if dtype is None else dtype
        else:
            shape = tuple(int(s) for s in like)
        if len(shape) != 3:
            raise ValueError(
                f"VariationalDropout1d.reset: expected a 3-d shape [N, L, C], got {shape}"
            )
        if not self.training or self.p == 0.0:
            self.mask = None
            return None
        if dtype is None or not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        gen_device = generator.device if generator is not None else device
        keep = torch.rand((shape[0], 1, shape[2]), generator=generator, device=gen_device)
        mask = (keep >= self.p).to(device=device, dtype=dtype) / (1.0 - self.p)
        self.mask = mask
        return mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None:
            raise RuntimeError(
                "VariationalDropout1d: call reset(x) before the forward pass in train() mode "
                "(the mask is sampled once per DEQ call and reused by every solver step)"
            )
        if x.dim() != 3 or self.mask.shape[0] != x.shape[0] or self.mask.shape[2] != x.shape[2]:
            raise RuntimeError(
                f"VariationalDropout1d: mask of shape {tuple(self.mask.shape)} does not match "
                f"input of shape {tuple(x.shape)}; call reset() with the current batch"
            )
        return x * self.mask
