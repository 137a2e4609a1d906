"""Multi-process (multi-GPU / multi-node) data parallelism.

Launch with ``torchrun --nproc_per_node=N -m phantomdeq train ...`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). The process group
uses NCCL when the run is on CUDA and gloo otherwise. Every rank draws the same global,
per-epoch permutation from ``(seed, epoch)`` and takes its own strided share of each global
batch (:func:`shard_batches`), so a run on N ranks with global batch B makes the same updates
as one process with batch B (GroupNorm and the losses are per sample; DDP averages the
gradients of equal-sized shards, which equals the gradient of the global mean loss).
BatchNorm layers (MDEQ's stem and head) would otherwise normalise with per-rank statistics, so
:func:`convert_batchnorm` makes them use the statistics of the global batch: torch's
``SyncBatchNorm`` on GPUs and :class:`GlobalBatchNorm` (gloo all-reduce) on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "GlobalBatchNorm",
    "all_reduce_sum",
    "convert_batchnorm",
    "barrier",
    "cleanup",
    "epoch_permutation",
    "init_distributed",
    "shard_batches",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError as exc:
        raise RuntimeError(f"environment variable {name} must be an integer, got {text!r}") from exc


def init_distributed(device_type: str) -> DistInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and join the process group when
    ``WORLD_SIZE > 1`` (NCCL for ``device_type == "cuda"``, gloo otherwise)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"invalid RANK={rank} / WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    if world == 1:
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {name} is not set (launch with torchrun)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, True)


def cleanup(info: DistInfo) -> None:
    """Leave the process group if this module created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (identity on one process)."""
    if info.enabled and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global sample order of ``epoch``: a permutation of ``range(n)`` that depends only on
    ``(seed, epoch)`` (so a resumed run sees the same order as an uninterrupted one)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**63))
    return torch.randperm(n, generator=g)


def shard_batches(
    order: torch.Tensor,
    batch_size: int,
    info: DistInfo,
    *,
    drop_last: bool,
) -> list[torch.Tensor]:
    """Split a global order into global batches of ``batch_size`` and keep this rank's share
    (samples ``rank, rank + W, ...`` of each batch). ``batch_size`` must be divisible by the
    world size; with several ranks a final partial batch is dropped so shards stay equal."""
    world = info.world_size
    if batch_size % world != 0:
        raise ValueError(
            f"data.batch_size ({batch_size}) must be divisible by the number of processes ({world})"
        )
    n = order.numel()
    full = n // batch_size
    bounds = [(i * batch_size, (i + 1) * batch_size) for i in range(full)]
    rest = n - full * batch_size
    if rest and not drop_last and world == 1:
        bounds.append((full * batch_size, n))
    return [order[a:b][info.rank :: world] for a, b in bounds]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the backward pass sums the incoming gradients too (each
    rank's input influences every rank's output)."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


class GlobalBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch (summed
    over all ranks with a differentiable all-reduce); any backend, CPU included.

    Per channel: ``mean = sum(x) / N``, ``var = sum(x^2) / N - mean^2`` over the ``N`` samples
    x pixels of all ranks; running statistics use the unbiased variance like ``BatchNorm2d``.
    Outside training (or without an initialised process group) it is ``BatchNorm2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GlobalBatchNorm: expected [N, C, H, W], got {tuple(x.shape)}")
        c = x.shape[1]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.full((1,), float(xf.numel() // c), dtype=xf.dtype, device=xf.device)
        packed = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        packed = _AllReduceSum.apply(packed)
        total = packed[-1]
        mean = packed[:c] / total
        var = (packed[c : 2 * c] / total - mean * mean).clamp_min(0.0)
        if (
            self.track_running_stats
            and self.running_mean is not None
            and self.running_var is not None
        ):
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else float(self.momentum)
                )
                n = float(total)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - factor).add_(
                    mean.detach().to(self.running_mean.dtype), alpha=factor
                )
                self.running_var.mul_(1 - factor).add_(
                    unbiased.to(self.running_var.dtype), alpha=factor
                )
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every ``BatchNorm2d`` so training normalises with global-batch statistics:
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere. Parameters and
    buffers (and hence ``state_dict`` keys) are kept."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


def _to_global_bn(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        with torch.no_grad():
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global_bn(child))
    return out
