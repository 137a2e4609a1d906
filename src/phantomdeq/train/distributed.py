"""Multi-process (multi-GPU / multi-node) data parallelism.

Launch with ``torchrun --standalone --nproc_per_node=N -m phantomdeq train ...`` (or any
launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``). The process group uses gloo on CPUs and, on GPUs, NCCL for CUDA tensors with
gloo for the loop's small CPU tensors. Every rank draws the same global, per-epoch permutation
from ``(seed, epoch)`` and takes its own strided share of each global batch
(:func:`shard_batches`); DDP averages the gradients of the equal-sized shards, which is the
gradient of the global mean loss (GroupNorm and the losses are per sample). BatchNorm layers
(MDEQ's stem and head) would otherwise normalise with per-rank statistics, so
:func:`convert_batchnorm` makes them use the statistics of the global batch: torch's
``SyncBatchNorm`` on GPUs and :class:`GlobalBatchNorm` (gloo all-reduce) on CPUs. Rank 0
loads (downloads) the data first while the others wait (:func:`rank0_first`); precise-BN
recalibration gives every rank the same number of forwards (equal, non-empty shards).

What N ranks guarantee, compared with one process at the same global batch B:

* **Across ranks: identical.** After every step all ranks hold bitwise-identical parameters,
  optimiser states and BatchNorm running statistics (every rank applies the same all-reduced
  gradient; tested with ``torch.equal``).
* **Against one process: equal up to floating-point summation order** -- tested to 1e-9
  (absolute, parameters of order 1) after two SGD-momentum steps in float64 for IFT, NPG and
  UPG -- *provided* that nothing depends on how the batch is split:

  - the forward solver runs a fixed number of iterations (``tol`` not reached, e.g.
    ``tol: 0``). The solvers stop when *every sample of the batch they see* has converged,
    so a half batch can stop at another iteration than the whole batch and the equilibrium
    states -- hence the gradients -- differ by up to ``tol`` (the same holds for the
    evaluation solver, so evaluation metrics of identical weights can differ slightly);
  - no per-rank randomness: variational-dropout masks, augmentation and the Hutchinson
    probes of Jacobian regularisation are drawn per rank (seeded by ``(seed, epoch, step,
    rank)``), so the N-rank run draws other masks/crops than the single process;
  - ``data.drop_last`` or a data-set size divisible by B (the last partial batch is dropped
    with several ranks).

  In float32 splitting the batch alone changes the gradients by ~3e-6 relative (rounding of
  the different summation order), parameters by ~1e-5 after two steps; training amplifies such
  differences, so long float32 runs on N ranks and on one process end in different models of
  the same quality, not in equal ones. The shipped digits recipe (float32, Anderson stopping at
  tol 1e-3, 6 epochs) ended at 99.16 % (2 ranks) vs 99.44 % (1 process): one of its 360 test
  images.

Where a run's seeds are made: :func:`seed_of` mixes integers (a run's seed, the epoch, the
batch, the rank, ...) into a seed for a ``torch.Generator``, :func:`order_seed` is the seed of
an epoch's sample order, :func:`seed_everything` seeds the global generators of torch,
``random`` and NumPy.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "order_seed",
    "seed_everything",
    "seed_of",
    "DistInfo",
    "DistributedError",
    "GlobalBatchNorm",
    "all_reduce_sum",
    "convert_batchnorm",
    "barrier",
    "cleanup",
    "epoch_permutation",
    "init_distributed",
    "rank0_first",
    "shard_batches",
]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Another rank failed (its own error is on its stderr); this rank stops too."""


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
    # on GPUs: NCCL for the CUDA tensors (gradients, SyncBatchNorm) and gloo for the small
    # CPU tensors of the loop's bookkeeping (loss sums, flags)
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    _import_group_defaults()
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, True)


def _import_group_defaults() -> None:
    """Import ``torch.distributed.nn.functional`` *before* the process group exists.

    Its ten collectives (``all_reduce``, ``broadcast``, ...) take ``group=group.WORLD`` as a
    default argument, evaluated when the module is first imported. DDP's constructor imports it
    (through ``torch._dynamo``); imported after ``init_process_group`` the defaults capture the
    default ``ProcessGroup`` itself, ``destroy_process_group`` can then no longer free it, and
    the gloo backend with its native threads (two ``pt_gloo_runloop`` workers and the
    ``gloo_tcp_loop``) lives until the interpreter shuts down. It is then destroyed inside
    ``Py_FinalizeEx`` (seen in gdb: ``~ProcessGroupGloo`` called from ``finalize_modules``),
    where a native thread that needs the GIL is killed by the finalising interpreter and
    aborts the process: "terminate called without an active exception" after a successful run.
    Imported first, the defaults are ``None`` and the group is freed by ``destroy_process_group``.
    (A lazy import: the module pulls in ``torch.distributed.rpc``, seconds of start-up that a
    single-process run does not need.)"""
    import torch.distributed.nn.functional  # noqa: F401


def cleanup(info: DistInfo) -> None:
    """Leave the process group if this module created it, and collect garbage so that objects
    in reference cycles holding it (DDP's reducer) free it -- joining the gloo threads -- now
    rather than during interpreter shutdown. Drop your references to the DDP wrapper first."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def rank0_first(fn: Callable[[], T], info: DistInfo) -> T:
    """Run ``fn`` on rank 0 first, then -- once it succeeded -- on the other ranks, which wait
    for it in a collective (e.g. rank 0 downloads or prepares a data set, the others then read
    the prepared files instead of writing the same ones). If ``fn`` fails on rank 0, rank 0
    raises its error and every other rank :class:`DistributedError` instead of hanging."""
    if not (info.enabled and dist.is_initialized()):
        return fn()
    failed = torch.zeros(1)
    if info.is_main:
        try:
            result = fn()
        except BaseException:
            failed.fill_(1.0)
            dist.all_reduce(failed)  # release the waiting ranks, then report the error here
            raise
    dist.all_reduce(failed)
    if info.is_main:
        return result
    if float(failed) > 0:
        raise DistributedError("rank 0 failed while preparing the data (see its error)")
    return fn()


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
    g = torch.Generator().manual_seed(order_seed(seed, epoch))
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

    Per channel, over the ``N`` samples x pixels of all ranks, in two passes (two all-reduces):
    ``mean = sum(x) / N``, then ``var = sum((x - mean)^2) / N`` -- the centred second moment,
    free of the cancellation of ``E[x^2] - mean^2`` when ``|mean| >> std`` (e.g. 1e4 + N(0, 1)
    in fp32 would lose every digit of the variance). The sums are accumulated in float64.
    Running statistics use the unbiased variance like ``BatchNorm2d``. Outside training (or
    without an initialised process group) it is ``BatchNorm2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GlobalBatchNorm: expected [N, C, H, W], got {tuple(x.shape)}")
        c = x.shape[1]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        acc = torch.float64
        count = torch.full((1,), float(xf.numel() // c), dtype=acc, device=xf.device)
        packed = _AllReduceSum.apply(torch.cat([xf.sum(dim=(0, 2, 3), dtype=acc), count]))
        total = packed[-1]
        mean = (packed[:c] / total).to(xf.dtype)
        centred = xf - mean[None, :, None, None]
        m2 = _AllReduceSum.apply((centred * centred).sum(dim=(0, 2, 3), dtype=acc))
        var = (m2 / total).to(xf.dtype)
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
        y = centred * torch.rsqrt(var[None, :, None, None] + self.eps)
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


# --- seeds (of the sample order, the steps' generators and the globals) ----------------------------------------------------------------------------------


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixing integers (FNV-1a: stable across processes and Python versions)."""
    h = 1469598103934665603
    for p in parts:
        h ^= int(p) & 0xFFFFFFFFFFFFFFFF
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def order_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's global sample order (the mix the data order of every run so far
    was drawn with; changing it would change every recorded result)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**63)


def seed_everything(seed: int) -> None:
    """Seed the global torch, ``random`` and NumPy generators with ``seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
