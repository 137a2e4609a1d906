"""Multi-process (multi-GPU / multi-node) data parallelism.

Launch with ``torchrun --nproc_per_node=N -m phantomdeq train ...`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). The process group
uses NCCL when the run is on CUDA and gloo otherwise. Every rank draws the same global,
per-epoch permutation from ``(seed, epoch)`` and takes its own strided share of each global
batch (:func:`shard_batches`), so a run on N ranks with global batch B makes the same updates
as one process with batch B (GroupNorm and the losses are per sample; DDP averages the
gradients of equal-sized shards, which equals the gradient of the global mean loss).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_sum",
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
