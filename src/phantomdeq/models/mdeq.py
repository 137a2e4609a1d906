"""Multiscale deep equilibrium model (MDEQ; Bai, Koltun & Kolter, 2020).

This is the implicit model the paper trains in its ablation setting (MDEQ-Tiny, 170K
parameters, Sec. 3 / Table 1) and its large-scale setting (MDEQ on CIFAR-10 with 10M
parameters and on ImageNet with 18M parameters, Table 3).

Structure (one equilibrium layer ``F``, eq. (1): ``h* = F(h*, x)``):

* ``h`` is a *tuple* of feature maps, one per branch; branch ``i`` has ``channels[i]``
  channels at half the resolution of branch ``i-1``.
* Each branch applies residual BASIC block(s): conv3x3 (C -> C*expansion), GroupNorm, ReLU,
  conv3x3 (back to C), variational dropout, ``+ injection``, GroupNorm, ``+ residual``, ReLU,
  GroupNorm.  The convolutions are weight-normalised.  The input injection ``x`` (output of
  the stem) enters branch 0 only; lower-resolution branches receive zero injection.
* Multiscale fusion (sum): branch ``i`` receives the sum of every branch's block output,
  resampled to its resolution -- strided 3x3 convolutions (+GroupNorm) to go down, 1x1
  convolution (+GroupNorm) and interpolation to go up -- followed by ReLU, a 1x1 convolution
  and GroupNorm.
* The classification head (outside the equilibrium) turns each branch into ``head_channels[i]*4``
  channels with a bottleneck block, downsamples-and-adds from high to low resolution, applies a
  1x1 convolution to ``final_channels``, global average pooling and a linear classifier.

The equilibrium state is solved by :class:`phantomdeq.DEQ` directly on the tuple of feature
maps (no per-step flattening).  ``mode="unrolled"`` is MDEQ's pretraining stage: ``F`` applied
``unrolled_steps`` times from zeros with plain autograd (a weight-tied RNN).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from phantomdeq._validate import check_choice, check_int
from phantomdeq.deq import DEQ
from phantomdeq.grad.base import GradientEstimator
from phantomdeq.grad.correction import Correction
from phantomdeq.nn.dropout import VariationalDropout2d
from phantomdeq.nn.jacobian import jacobian_frobenius_hutchinson
from phantomdeq.precision import AutocastCell
from phantomdeq.solvers.base import Solution, Solver

from .mdeq_config import MDEQ_CONFIG_NAMES, MDEQConfig, mdeq_config, with_overrides
from .mdeq_layers import Head, conv, conv3x3, make_stem

__all__ = [
    "MDEQ",
    "MDEQCell",
    "MDEQConfig",
    "MDEQOutput",
    "MDEQ_CONFIG_NAMES",
    "mdeq_config",
    "with_overrides",
]

_MODES = ("deq", "unrolled")


# --------------------------------------------------------------------------- building blocks


def _maybe_wn(conv: nn.Conv2d, enabled: bool) -> nn.Conv2d:
    return weight_norm(conv, name="weight", dim=0) if enabled else conv


class BasicBlock(nn.Module):
    """MDEQ residual block: ``GN(ReLU(GN(drop(conv2(ReLU(GN(conv1 x)))) + inj) + x))``."""

    def __init__(
        self,
        channels: int,
        *,
        expansion: int,
        num_groups: int,
        dropout: float,
        use_weight_norm: bool,
        spatial_dropout: bool,
    ) -> None:
        super().__init__()
        inner = channels * expansion
        self.conv1 = _maybe_wn(conv3x3(channels, inner), use_weight_norm)
        self.gn1 = nn.GroupNorm(num_groups, inner)
        self.conv2 = _maybe_wn(conv3x3(inner, channels), use_weight_norm)
        self.gn2 = nn.GroupNorm(num_groups, channels)
        self.gn3 = nn.GroupNorm(num_groups, channels)
        self.drop = VariationalDropout2d(dropout, spatial=spatial_dropout)

    def forward(self, x: Tensor, injection: Tensor | None = None) -> Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + x
        return self.gn3(F.relu(out))


class _Downsample(nn.Module):
    """``levels`` stride-2 3x3 convolutions from branch j to branch i > j (fusion, going down)."""

    def __init__(self, cin: int, cout: int, levels: int, num_groups: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(levels):
            last = k == levels - 1
            c_out = cout if last else cin
            layers += [conv3x3(cin, c_out, stride=2), nn.GroupNorm(num_groups, c_out)]
            if not last:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.net(x)


class _Upsample(nn.Module):
    """1x1 convolution + GroupNorm, then interpolation to the target branch's size."""

    def __init__(self, cin: int, cout: int, num_groups: int, mode: str) -> None:
        super().__init__()
        self.conv = conv(cin, cout, 1)
        self.gn = nn.GroupNorm(num_groups, cout)
        self.mode = mode

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        y = self.gn(self.conv(x))
        if self.mode == "bilinear":
            return F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return F.interpolate(y, size=size, mode="nearest")


class MDEQCell(nn.Module):
    """The equilibrium layer ``F(h, x)`` of MDEQ, acting on a tuple of per-branch feature maps.

    ``forward(h, x)`` takes ``h = (h_0, ..., h_{n-1})`` with ``h_i`` of shape
    ``[B, channels[i], H_i, W_i]`` and the injection ``x`` of shape ``[B, channels[0], H_0, W_0]``
    and returns a tuple of the same shapes.  Call :meth:`reset` before each DEQ solve to
    sample the variational-dropout masks shared by every evaluation of ``F`` in that solve.
    """

    def __init__(self, cfg: MDEQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.num_branches
        g = cfg.num_groups
        self.branches = nn.ModuleList(
            nn.ModuleList(
                BasicBlock(
                    c,
                    expansion=cfg.expansion,
                    num_groups=g,
                    dropout=cfg.dropout,
                    use_weight_norm=cfg.weight_norm,
                    spatial_dropout=cfg.spatial_dropout,
                )
                for _ in range(cfg.num_blocks)
            )
            for c in cfg.channels
        )
        # fuse[i][j]: resample branch j's block output to branch i (None on the diagonal).
        fuse: list[nn.ModuleList] = []
        for i in range(n):
            row: list[nn.Module] = []
            for j in range(n):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:
                    row.append(_Upsample(cfg.channels[j], cfg.channels[i], g, cfg.upsample_mode))
                else:
                    row.append(_Downsample(cfg.channels[j], cfg.channels[i], i - j, g))
            fuse.append(nn.ModuleList(row))
        self.fuse = nn.ModuleList(fuse)
        self.post_fuse = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                _maybe_wn(conv(c, c, 1), cfg.weight_norm),
                nn.GroupNorm(g // 2, c),
            )
            for c in cfg.channels
        )

    def blocks(self, branch: int) -> list[BasicBlock]:
        """The residual blocks of ``branch``."""
        return [cast(BasicBlock, b) for b in cast(nn.ModuleList, self.branches[branch])]

    def reset(self, h: Sequence[Tensor], *, generator: torch.Generator | None = None) -> None:
        """Sample new dropout masks for states shaped like ``h`` (no-op in eval mode)."""
        if len(h) != self.cfg.num_branches:
            raise ValueError(
                f"MDEQCell.reset: expected {self.cfg.num_branches} tensors, got {len(h)}"
            )
        for i, hi in enumerate(h):
            for block in self.blocks(i):
                block.drop.reset(hi, generator=generator)

    def forward(self, h: Sequence[Tensor], x: Tensor) -> tuple[Tensor, ...]:
        n = self.cfg.num_branches
        if len(h) != n:
            raise ValueError(f"MDEQCell: expected a state tuple of {n} tensors, got {len(h)}")
        outs: list[Tensor] = []
        for i, hi in enumerate(h):
            y = hi
            for k, block in enumerate(self.blocks(i)):
                y = block(y, x if (i == 0 and k == 0) else None)
            outs.append(y)
        fused: list[Tensor] = []
        for i in range(n):
            size = (outs[i].shape[-2], outs[i].shape[-1])
            acc = outs[i]
            row = cast(nn.ModuleList, self.fuse[i])
            for j in range(n):
                if j != i:
                    acc = acc + row[j](outs[j], size)
            fused.append(self.post_fuse[i](acc))
        return tuple(fused)


# --------------------------------------------------------------------------- the model


@dataclass
class MDEQOutput:
    """Result of :meth:`MDEQ.forward`.

    Attributes:
        logits: class scores ``[B, num_classes]``.
        info: the solver's :class:`phantomdeq.Solution` (None in ``mode="unrolled"``).
        jac_loss: Hutchinson estimate of ``||dF/dh||_F^2 / numel(h)`` at the final state when
            ``jac_reg=True`` (a scalar tensor), else None.
        state: the final per-branch state ``h`` (carrying the DEQ gradient in train mode).
        state_logits: under fixed-point correction (the DEQ's ``correction`` with N > 1
            states, when a gradient is attached), the head's class scores for every
            supervised state, earliest first; the last is ``logits``. Else None.
        state_weights: their loss weights ``[γ^{N−1}, …, γ, 1]`` (None without correction).
    """

    logits: Tensor
    info: Solution | None = None
    jac_loss: Tensor | None = None
    state: tuple[Tensor, ...] | None = None
    state_logits: list[Tensor] | None = None
    state_weights: list[float] | None = None


class MDEQ(nn.Module):
    """Multiscale DEQ classifier: stem -> ``DEQ(F)`` on a tuple state -> head.

    Args:
        cfg: architecture (see :func:`mdeq_config`).
        num_classes: output classes.
        in_channels: image channels (1 for MNIST/digits, 3 for CIFAR/ImageNet).
        solver: forwarded to :class:`phantomdeq.DEQ`: the forward solver in train mode.
        grad: forwarded to :class:`phantomdeq.DEQ`: the gradient estimator -- IFT eq. (4),
            UPG eq. (17), NPG eq. (18), ...
        eval_solver: forwarded to :class:`phantomdeq.DEQ`: the optional solver used in eval
            mode.
        correction: forwarded to :class:`phantomdeq.DEQ`: fixed-point correction
            (:class:`phantomdeq.Correction`), or None.

    Attributes:
        deq: the :class:`phantomdeq.DEQ` wrapping the equilibrium cell.
        f: the equilibrium cell :class:`MDEQCell` (the same module object as ``deq``'s).
    """

    def __init__(
        self,
        cfg: MDEQConfig,
        *,
        num_classes: int,
        in_channels: int,
        solver: Solver,
        grad: GradientEstimator,
        eval_solver: Solver | None = None,
        correction: Correction | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, MDEQConfig):
            raise TypeError(f"MDEQ: cfg must be an MDEQConfig, got {type(cfg).__name__}")
        for field, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            check_int(field, v, minimum=1, owner="MDEQ")
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stem = make_stem(cfg, in_channels)
        self.deq = DEQ(
            MDEQCell(cfg),
            solver=solver,
            grad=grad,
            eval_solver=eval_solver,
            correction=correction,
        )
        self.head = Head(cfg, num_classes)

    @property
    def f(self) -> MDEQCell:
        """The equilibrium cell ``F`` (owned by :attr:`deq`, registered once in state_dict)."""
        cell = self.deq.f
        if not isinstance(cell, MDEQCell):
            raise TypeError(
                f"MDEQ.f: expected the DEQ to own an MDEQCell, got {type(cell).__name__}"
            )
        return cell

    def initial_state(self, injection: Tensor) -> tuple[Tensor, ...]:
        """Zeros per branch; branch ``i`` has ``ceil(H/2**i) x ceil(W/2**i)`` pixels. The
        state has the parameters' dtype even when ``injection`` is a low-precision autocast
        output (the solver's state, history and residuals stay in the storage precision)."""
        b, _, h, w = injection.shape
        dtype = self.state_dtype(injection)
        zs = []
        for c in self.cfg.channels:
            zs.append(injection.new_zeros((b, c, h, w), dtype=dtype))
            h, w = (h + 1) // 2, (w + 1) // 2
        return tuple(zs)

    def state_dtype(self, injection: Tensor) -> torch.dtype:
        """The dtype of the equilibrium state: the cell's parameter dtype (float32 / float64),
        or ``injection``'s when the cell has no floating parameters."""
        for p in self.deq.f.parameters():
            if p.is_floating_point():
                return p.dtype
        return injection.dtype

    def _start(self, inj: Tensor, z0: Sequence[Tensor] | None) -> tuple[Tensor, ...]:
        """The solve's start: zeros, or ``z0`` checked against their shapes and dtypes."""
        start = self.initial_state(inj)
        if z0 is None:
            return start
        given = tuple(z0)
        if len(given) != len(start) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(given, start)
        ):
            raise ValueError(
                "MDEQ.forward: z0 must be one tensor per branch with the shapes and dtype "
                f"{[(tuple(b.shape), b.dtype) for b in start]}, got "
                f"{[(tuple(a.shape), a.dtype) for a in given]}"
            )
        return given

    def forward(
        self,
        x: Tensor,
        *,
        mode: str = "deq",
        unrolled_steps: int = 0,
        jac_reg: bool = False,
        generator: torch.Generator | None = None,
        z0: Sequence[Tensor] | None = None,
    ) -> MDEQOutput:
        """Classify ``x`` ``[B, in_channels, H, W]``.

        ``mode="deq"`` solves ``h* = F(h*, x)`` with the DEQ (gradient per the chosen estimator);
        ``mode="unrolled"`` applies ``F`` ``unrolled_steps`` times from zeros with plain
        autograd (MDEQ's pretraining stage).  ``jac_reg=True`` adds the Hutchinson estimate of
        ``||dF/dh||_F^2 / numel(h)`` at the final state (one extra tracked ``F`` evaluation).
        ``generator`` (optional) drives the dropout masks. ``z0`` (``mode="deq"``): the start
        of the solve, one tensor per branch shaped like :meth:`initial_state` (default zeros),
        e.g. the sample's previous equilibrium (warm start); the solution does not depend on
        it beyond the solver's tolerance.

        Mixed precision: called under ``torch.autocast`` (e.g. bf16), the stem, every
        evaluation of ``F`` and the head run under that autocast, while the equilibrium state
        stays in the parameters' dtype and the solver's own arithmetic (norms, residuals,
        Anderson's mixing and small solve, Broyden's updates, the phantom-gradient damping
        ``(1 - λ) h + λ F(h)``) runs with autocast off: ``F`` is wrapped in
        :class:`AutocastCell` (autocast inside, output cast back to the state dtype).
        """
        check_choice("mode", mode, _MODES, owner="MDEQ.forward")
        if not isinstance(x, Tensor):
            raise TypeError(f"MDEQ.forward: x must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MDEQ.forward: x must have shape [B, {self.in_channels}, H, W], "
                f"got {tuple(x.shape)}"
            )
        inj = self.stem(x)
        start = self._start(inj, z0)
        self.f.reset(start, generator=generator)
        device_type = x.device.type
        amp = torch.is_autocast_enabled(device_type)
        cell: nn.Module = self.f
        deq = self.deq
        if amp:
            cell = AutocastCell(
                cell, dtype=torch.get_autocast_dtype(device_type), device_type=device_type
            )
            deq = self.deq.with_cell(cell)
        info = None
        with torch.autocast(device_type, enabled=False) if amp else contextlib.nullcontext():
            if mode == "unrolled":
                check_int("unrolled_steps", unrolled_steps, minimum=1, owner="MDEQ.forward")
                z: tuple[Tensor, ...] = start
                for _ in range(unrolled_steps):
                    z = cell(z, inj)
            else:
                zz, info = deq(start, inj)
                z = tuple(zz) if isinstance(zz, (tuple, list)) else (zz,)
            jac_loss = None
            if jac_reg:
                track = torch.is_grad_enabled() and self.training
                with torch.enable_grad():
                    hs = tuple(t.detach().requires_grad_(True) for t in z)
                    fh = cell(hs, inj if track else inj.detach())
                    jac_loss = jacobian_frobenius_hutchinson(fh, hs, 1, create_graph=track)
                if not track:
                    jac_loss = jac_loss.detach()
        logits = self.head(z)
        out = MDEQOutput(logits=logits, info=info, jac_loss=jac_loss, state=z)
        if info is not None and info.states is not None and info.state_weights is not None:
            earlier = [self.head(tuple(s)) for s in info.states[:-1]]
            out.state_logits = [*earlier, logits]
            out.state_weights = list(info.state_weights)
        return out
