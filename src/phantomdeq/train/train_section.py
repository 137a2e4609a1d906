"""The ``train`` section of a training config (:class:`TrainConfig`: the loop, precision, the
gradient monitor, reliability, compilation and warm starts) and the metrics label of a
``train.monitor_compare`` estimator."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field

from .precision import check_precision
from .sections import (
    ConfigError,
    Float,
    GradConfig,
    NonNegFloat,
    NonNegInt,
    PosInt,
    Section,
    SolverConfig,
    solver_default,
)

__all__ = ["TrainConfig", "monitor_label"]


class TrainConfig(Section):
    """Training loop options.

    ``pretrain_steps`` iterations of plain unrolled training (``model(x, mode="unrolled",
    unrolled_steps=unrolled_steps)``, the MDEQ pre-training stage) come before the DEQ stage.
    Jacobian regularisation adds ``jac_reg_weight * jac_loss`` every ``jac_reg_every``
    iterations (weight 0 disables it). ``eval_every`` is in epochs. ``device``: ``auto``
    picks CUDA when available. ``num_threads`` > 0 sets ``torch.set_num_threads``. With
    several processes ``sync_bn`` makes BatchNorm layers use global-batch statistics (so N
    processes with global batch B train like one process with batch B).

    Precision (:mod:`phantomdeq.train.precision`): ``dtype`` is the *storage* precision of the
    parameters, optimiser state, input batches and the DEQ solver's state (``float64`` for
    reference and reproducibility runs); ``precision`` is the *compute* precision of the
    forward pass: ``bf16`` / ``fp16`` run the stem, the equilibrium cell and the head under
    ``torch.autocast`` (the solver's own arithmetic and the loss stay in fp32; ``fp16`` adds
    dynamic loss scaling with ``torch.amp.GradScaler``, whose state is checkpointed).
    Evaluation and precise-BN recalibration use the same precision. Low-precision compute
    needs ``dtype: float32``.

    Gradient-quality monitor (:mod:`phantomdeq.train.monitor`): every ``monitor_every`` DEQ-stage
    steps (0 = off) the gradient the step uses and the exact implicit gradient (eq. 4, IFT with
    the tight ``monitor_solver``) are computed on the same batch, forward solution and dropout
    mask, w.r.t. the equilibrium cell's parameters (``monitor_params: cell``) or all parameters
    (``all``); their cosine and norm ratio are logged as ``monitor_cos`` /
    ``monitor_norm_ratio`` (its cost as ``monitor_time_s``, excluded from the step timing). It
    changes no update, so these fields may differ on resume. ``monitor_compare`` lists further
    estimators (grad sections, e.g. ``[{name: upg, k: 5, lam: 0.5}, {name: npg, k: 5, lam:
    0.5}]``) measured against the same exact gradient without training with them -- the paper's
    Fig. 2 along an IFT-trained run -- logged as ``monitor_cos_<label>`` /
    ``monitor_norm_ratio_<label>`` with ``<label>`` = :func:`monitor_label` (``upg_k5_lam0.5``).
    ``{name: shine}`` reuses the forward solve's inverse estimate and needs ``solver.name:
    broyden``.

    ``bn_recalibration_batches`` > 0 recomputes the BatchNorm running statistics before each
    evaluation ("precise BN") from that many training batches (fixed order, no augmentation)
    passed through the model in eval mode -- eval solver, no dropout, no phantom unroll -- with
    only the BatchNorm layers collecting statistics. Early in DEQ training the states seen in
    training and in evaluation differ (the fixed point is not reached yet), and running statistics
    lagging behind fast-moving weights then ruin eval-mode accuracy; training itself is unchanged.

    Reliability (:mod:`phantomdeq.train.guard`): the loss and the global gradient norm are checked
    before every ``optimizer.step`` (all ranks agree), parameters and buffers before every
    checkpoint. ``on_nonfinite: stop`` ends the run with a divergence report naming the step and
    the last finite checkpoint; ``skip`` drops the step (no optimiser, schedule or BatchNorm
    update), counts it in ``metrics.jsonl`` (``skipped``) and the progress bar, and stops after
    ``max_skipped_steps`` consecutive skips. ``checkpoint_every_steps`` > 0 also writes
    ``last.pt`` every that many optimiser steps inside an epoch (0 = at epoch ends only);
    ``--resume`` continues from such a checkpoint exactly where it stopped.

    ``compile: true`` runs the model through ``torch.compile`` (:mod:`phantomdeq.train.compile`):
    a fixed-budget solve (``solver.tol: 0``) becomes one compiled graph; with ``tol > 0`` the
    solve loop runs eagerly around the compiled cell. The first steps pay the compilation.

    ``warm_start: true`` (:mod:`phantomdeq.train.warm_start`) keeps every training sample's
    last equilibrium in bfloat16 -- on the training device, or in pinned CPU memory with
    ``warm_start_memory: pinned`` on CUDA -- and starts the sample's next DEQ-stage solve
    there (samples not yet solved start from zeros). Its memory is printed when it is
    allocated (the first DEQ step); it is saved in checkpoints, so resuming stays exact.
    One process only (with several, each would hold only its own shard's states).
    """

    epochs: PosInt = 10
    seed: int = 0
    pretrain_steps: NonNegInt = 0
    unrolled_steps: NonNegInt = 0
    jac_reg_weight: NonNegFloat = 0.0
    jac_reg_every: PosInt = 1
    eval_every: PosInt = 1
    device: str = "auto"
    num_threads: NonNegInt = 0
    sync_bn: bool = True
    dtype: Literal["float32", "float64"] = "float32"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    label_smoothing: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.0
    monitor_every: NonNegInt = 0
    bn_recalibration_batches: NonNegInt = 0
    monitor_params: Literal["cell", "all"] = "cell"
    monitor_solver: SolverConfig = Field(
        default_factory=solver_default(name="broyden", max_iter=60, tol=1e-6)
    )
    monitor_compare: list[GradConfig] = Field(default_factory=list)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: PosInt = 10
    checkpoint_every_steps: NonNegInt = 0
    compile: bool = False
    warm_start: bool = False
    warm_start_memory: Literal["device", "pinned"] = "device"

    def check(self, prefix: str) -> None:
        self.monitor_solver.check(f"{prefix}.monitor_solver")
        labels: list[str] = []
        for i, g in enumerate(self.monitor_compare):
            g.check(f"{prefix}.monitor_compare[{i}]")
            if g.name == "bptt":
                raise ConfigError(
                    f"{prefix}.monitor_compare[{i}].name: 'bptt' cannot be compared (it needs the "
                    f"forward iterations recorded); allowed: ift, upg, npg, onestep"
                )
            label = monitor_label(g)
            if label in labels:
                raise ConfigError(
                    f"{prefix}.monitor_compare[{i}]: estimator {label!r} is listed twice"
                )
            labels.append(label)
        if self.pretrain_steps > 0 and self.unrolled_steps < 1:
            raise ConfigError(
                f"{prefix}.unrolled_steps: must be >= 1 when pretrain_steps > 0, "
                f"got {self.unrolled_steps!r}"
            )
        problem = check_precision(self.precision, self.dtype)
        if problem is not None:
            raise ConfigError(problem)
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ConfigError(
                f"{prefix}.device: allowed 'auto', 'cpu', 'cuda', 'cuda:N'; got {self.device!r}"
            )


def monitor_label(g: GradConfig) -> str:
    """The metrics label of a ``train.monitor_compare`` estimator: its name, plus ``_k<k>_lam<λ>``
    for the phantom gradients (``upg_k5_lam0.5``)."""
    if g.name in ("upg", "npg"):
        opts = g.kwargs()  # k and lam, fields of the generated GradConfig
        return f"{g.name}_k{opts['k']}_lam{float(opts['lam']):g}"
    return str(g.name)
