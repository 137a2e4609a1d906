"""The state one training run carries (:class:`TrainerState`): what is built from the config,
where the run stands, and the statistics a checkpoint saves. The trainer's parts -- set-up
(:mod:`.setup`), checkpoints and resume (:mod:`.resume`), the failure policy
(:mod:`.failures`), reporting (:mod:`.reporting`) and the loop itself (:mod:`.trainer`) --
share it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import Config
from .distributed import DistInfo, all_reduce_sum
from .guard import StopSignals
from .run_folder import RunFolder

if TYPE_CHECKING:
    from .build import LRSchedule, ModelCall
    from .data import Batches
    from .metrics import MetricsLogger
    from .monitor import GradientMonitor
    from .precision import MixedPrecision
    from .tasks import Task
    from .warm_start import WarmStartStore

__all__ = ["TrainerState", "fresh_sums"]


def fresh_sums() -> dict[str, float]:
    """Accumulators of one epoch's training statistics (checkpointed mid-epoch)."""
    keys = ("loss", "acc", "n", "nstep", "res", "conv", "deq_n", "monitor_time", "skipped")
    return dict.fromkeys((*keys, "scaler_skipped"), 0.0)


class TrainerState:
    """Attributes of a run (set in ``__init__`` and :meth:`~.setup.SetupMixin._setup`)."""

    # the run's options
    config: Config
    out_dir: Path
    resume: bool
    overwrite: bool
    progress: bool
    #: Hook for more training state: objects with ``state_dict()`` / ``load_state_dict()``
    #: registered here under a name are saved in every checkpoint (under ``"extra"``) and
    #: restored on resume (e.g. ``self.extra_state["scaler"] = torch.amp.GradScaler()``).
    #: Register them in ``_setup`` before the checkpoint is loaded.
    extra_state: dict[str, Any]
    run_folder: RunFolder | None
    _stop: StopSignals
    _saved_epochs: int  # the epoch count the resumed run was planned for
    # built from the config
    dist: DistInfo
    device: torch.device
    dtype: torch.dtype
    amp: MixedPrecision
    train_data: Batches
    test_ds: Any
    num_classes: int  # from the data set's description (0 when it has none)
    in_channels: int
    task: Task  # the loss and the metrics (the config's task section)
    net: nn.Module  # the model (what checkpoints hold)
    model: nn.Module | None  # what the loop calls: ``net`` or its DDP wrapper
    call: ModelCall  # how the loop calls it (the forward options it takes, its output)
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    steps_per_epoch: int
    total_steps: int
    monitor: GradientMonitor | None
    logger: MetricsLogger
    warm_start: WarmStartStore | None  # train.warm_start: each sample's last equilibrium
    _batch_indices: torch.Tensor | None  # the sample indices of the step being trained
    # where the run stands (checkpointed)
    epoch: int  # completed epochs
    batch: int  # batches done in the current epoch (the next one is epoch + 1)
    step: int  # completed optimiser steps (skipped steps are not counted)
    skipped: int  # steps dropped by train.on_nonfinite: skip, in all
    consecutive_skips: int
    epoch_sums: dict[str, float]
    initial_loss: float | None  # training loss of the first step
    last_loss: tuple[int, float] | None  # (step, loss) of the last finite step
    last_checkpoint: tuple[int, int, int] | None  # (epoch, batch, step) of last.pt
    best: float | None  # the best evaluation value of the task's primary metric so far
    elapsed: float
    train_time: float
    last_eval: dict[str, float]

    # the parts of the trainer call each other through these (defined in their modules)
    def _resume_position(self) -> None:
        raise NotImplementedError  # .resume

    def _adopt_best(self) -> None:
        raise NotImplementedError  # .resume

    def _save(self, *, best: bool, at: str) -> None:
        raise NotImplementedError  # .resume

    def _diverged(self, what: str, at: str) -> Exception:
        raise NotImplementedError  # .failures

    def _draw_curves(self) -> None:
        raise NotImplementedError  # .reporting

    def _start_position(self) -> None:
        """A run at its very beginning."""
        self.epoch = self.batch = self.step = self.skipped = self.consecutive_skips = 0
        self.epoch_sums = fresh_sums()
        self.initial_loss = None
        self.last_loss = None
        self.last_checkpoint = None
        self.best = None
        self.elapsed = self.train_time = 0.0
        self.last_eval = {}

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce under DDP)."""
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        return bool(float(all_reduce_sum(value, self.dist)[0]) > 0)

    def _checkpoint_text(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        epoch, batch, step = self.last_checkpoint
        where = f"epoch {epoch}" if batch == 0 else f"epoch {epoch} + {batch} batches"
        return (
            f"the last (finite) checkpoint is {str(self.out_dir / 'last.pt')!r} "
            f"(after {where}, step {step})"
        )
