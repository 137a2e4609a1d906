"""Setting a run up from its config: processes and device, mixed precision, the run folder,
data, model, optimiser and schedule, the position to start from (a resumed checkpoint or the
beginning), the gradient monitor and the metrics files (:class:`SetupMixin`)."""

from __future__ import annotations

import sys

import torch

from .build import (
    LRSchedule,
    ModelCall,
    build_grad,
    build_model,
    build_solver,
    info_fields,
    load_data,
    make_optimizer,
    prepare_data,
    resolve_device,
)
from .config import ConfigError, monitor_label
from .data import Batches
from .distributed import (
    cleanup,
    convert_batchnorm,
    init_distributed,
    rank0_first,
    seed_everything,
    shard_batches,
)
from .metrics import MetricsLogger, missing_output_notes
from .precision import MixedPrecision, check_precision
from .run_folder import RunFolderError, dump_config, prepare_run_folder
from .tasks import build_task
from .trainer_state import TrainerState
from .warm_start import WarmStartStore

__all__ = ["SetupMixin"]


class SetupMixin(TrainerState):
    """``_setup`` (called first by ``fit``, inside its ``try``) and its parts, and
    ``_teardown`` (called last, in its ``finally``)."""

    def _setup(self) -> None:
        cfg = self.config
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        wanted = cfg.train.device
        device_type = (
            "cuda"
            if wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        self.dist = init_distributed(device_type)
        self.device = resolve_device(wanted, self.dist)
        problem = check_precision(cfg.train.precision, cfg.train.dtype, self.device.type)
        if problem is not None:
            raise ConfigError(problem)
        self.amp = MixedPrecision(cfg.train.precision, self.device.type)
        if self.amp.scaling:  # fp16: the loss scale found so far is part of the training state
            self.extra_state["grad_scaler"] = self.amp.scaler
        self._prepare_folder()
        try:
            self._build()
        except BaseException:
            # a run that fails before training leaves no folder it created
            if self.run_folder is not None:
                self.run_folder.discard()
            raise

    def _prepare_folder(self) -> None:
        """Rank 0 checks and prepares the run folder; every rank learns the verdict."""
        problem: RunFolderError | None = None
        if self.dist.is_main:
            try:
                self.run_folder = prepare_run_folder(
                    self.out_dir, resume=self.resume, overwrite=self.overwrite
                )
            except RunFolderError as exc:
                problem = exc
        if self._any_rank(problem is not None):
            raise problem or RunFolderError(f"--out: rank 0 refused {str(self.out_dir)!r}")
        if self.run_folder is not None and self.run_folder.removed:
            print(
                f"phantomdeq: --overwrite: deleted the previous run's "
                f"{', '.join(self.run_folder.removed)} in {str(self.out_dir)!r}",
                file=sys.stderr,
            )

    def _build(self) -> None:
        cfg = self.config
        self._build_model_and_data()
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.schedule = self._make_schedule(cfg.train.epochs)
        self._start_position()
        if self.resume:  # last.pt, else best.pt, else the beginning, or refused
            self._resume_position()
        if self.dist.is_main:
            dump_config(cfg, self.out_dir / "config.yaml")
        self.monitor = None
        if cfg.train.monitor_every > 0:
            from phantomdeq.grad import IFT

            from .monitor import GradientMonitor

            self.monitor = GradientMonitor(
                IFT(solver=build_solver(cfg.train.monitor_solver)),
                params=cfg.train.monitor_params,
                compare={monitor_label(g): build_grad(g) for g in cfg.train.monitor_compare},
            )
        self.logger = MetricsLogger(
            self.out_dir,
            enabled=self.dist.is_main,
            tensorboard=cfg.log.tensorboard,
            append=self.resume,
        )
        if self.dist.is_main:
            for note in missing_output_notes(
                tensorboard=cfg.log.tensorboard,
                tensorboard_works=self.logger.tensorboard_enabled,
                plot=cfg.log.plot,
            ):
                print(note, file=sys.stderr)

    def _build_model_and_data(self) -> None:
        """Data sets, the model (DDP-wrapped with several processes), optimiser and the
        epoch length."""
        cfg = self.config
        # rank 0 prepares (downloads) the data while the other ranks wait, then all load it
        rank0_first(lambda: prepare_data(cfg), self.dist)
        train_ds, test_ds, info = load_data(cfg)
        self.train_data = Batches(train_ds, cfg.data.num_workers)
        self.test_ds = test_ds
        fields = info_fields(info)
        self.num_classes = int(fields.get("num_classes", 0))
        self.in_channels = int(fields.get("in_channels", 0))
        self.task = build_task(cfg, info)

        seed_everything(cfg.train.seed)
        self.dtype = getattr(torch, cfg.train.dtype)
        model = build_model(cfg, info=info).to(self.device, self.dtype)
        self.call = ModelCall(model)
        self._check_model(model)
        if cfg.train.compile:  # in place: parameter names and state_dict keys unchanged
            from .build import compile_model

            compile_model(model)
        self.net = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if cfg.train.sync_bn:
                model = convert_batchnorm(model, self.device.type)
                self.net = model

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.warm_start = None
        if cfg.train.warm_start:
            if self.dist.enabled:
                raise ConfigError(
                    "train.warm_start: needs a single process (each of the "
                    f"{self.dist.world_size} processes would keep only its own shard's states)"
                )
            self.warm_start = WarmStartStore(
                len(self.train_data),
                self.device,
                pinned=cfg.train.warm_start_memory == "pinned",
                announce=self.dist.is_main,
            )
            self.extra_state["warm_start"] = self.warm_start
        self.optimizer = make_optimizer(self.net, cfg.optim)
        self.steps_per_epoch = len(
            shard_batches(
                torch.arange(len(self.train_data)),
                cfg.data.batch_size,
                self.dist,
                drop_last=cfg.data.drop_last,
            )
        )
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size: {cfg.data.batch_size} is larger than the training set "
                f"({len(self.train_data)} samples) with drop_last; lower it or set data.drop_last: false"
            )

    def _check_model(self, model: torch.nn.Module) -> None:
        """What the config's training options need from the model (a one-line error naming the
        option): an unrolled mode for pre-training, the Jacobian regulariser, a warm start, a
        DEQ inside for the gradient monitor."""
        t = self.config.train
        target = self.config.model.resolved()[0]
        if t.pretrain_steps > 0:
            self.call.require(
                ("mode", "unrolled_steps"), "train.pretrain_steps", "unrolled pre-training", target
            )
        if t.jac_reg_weight > 0:
            self.call.require(("jac_reg",), "train.jac_reg_weight", "the regulariser", target)
        if t.warm_start:
            self.call.require(("z0",), "train.warm_start", "a warm start", target)
        if t.monitor_every > 0 or t.warm_start:
            from .monitor import find_deq

            try:
                find_deq(model)
            except ValueError:
                key = "train.monitor_every" if t.monitor_every > 0 else "train.warm_start"
                raise ConfigError(
                    f"{key}: needs a phantomdeq.DEQ inside the model; model {target!r} has none"
                ) from None

    def _make_schedule(self, epochs: int) -> LRSchedule:
        o = self.config.optim
        return LRSchedule(
            self.optimizer,
            base_lr=o.lr,
            total_steps=self.steps_per_epoch * epochs,
            warmup_steps=o.warmup_steps,
            min_lr=o.min_lr,
            kind=o.schedule,
        )

    def _teardown(self) -> None:
        """Close the metrics files, draw the curves (rank 0) and leave the process group.

        Leaving is more than ``destroy_process_group``: the gloo process group, and with it its
        native worker and TCP-loop threads, is freed only when nothing references it any more.
        The DDP wrapper does (it is dropped here; :func:`~.distributed.cleanup` then collects
        garbage), and so would ``torch.distributed.nn.functional`` had it been imported after
        the group was created (:func:`~.distributed.init_distributed` imports it first). A
        group still alive at exit is destroyed inside the interpreter's shutdown, where its
        threads can abort the process ("terminate called without an active exception")."""
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()
        train_data = getattr(self, "train_data", None)
        if train_data is not None:
            train_data.close()  # the loader's worker processes
        dist_info = getattr(self, "dist", None)
        if dist_info is not None:
            self._draw_curves()
            if self.model is not None and self.model is not getattr(self, "net", None):
                self.model = getattr(self, "net", None)  # drop the DDP wrapper
            cleanup(dist_info)
        if self.run_folder is not None:
            self.run_folder.release()
