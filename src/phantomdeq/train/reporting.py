"""What a run reports (:class:`ReportingMixin`): the progress bar, the one-line epoch summary
and the resume notice on stderr, the epoch's training statistics, ``curves.png`` and the final
metrics that :func:`~.trainer.run_training` returns."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np

from phantomdeq._progress import NullBar, progress_bar

from .build import replan_note
from .metrics import plot_curves, read_metrics
from .trainer_state import TrainerState

__all__ = ["ReportingMixin"]


class ReportingMixin(TrainerState):
    """Reports on stderr and in the run folder."""

    def _progress_bar(self, epoch: int, total: int, start: int) -> Any:
        """A tqdm bar on stderr for rank 0 when progress is on (and tqdm is installed), else
        None."""
        if not (self.progress and self.dist.is_main):
            return None
        bar = progress_bar(
            enabled=True,
            auto=True,
            total=total,
            initial=start,
            desc=f"epoch {epoch + 1}/{self.config.train.epochs}",
            leave=False,
            dynamic_ncols=True,
        )
        return None if isinstance(bar, NullBar) else bar

    def _show_step(self, bar: Any, rec: dict[str, Any]) -> None:
        if bar is None:
            return
        bar.update(1)
        deq = rec["stage"] == "deq"
        post = {m: f"{rec[f'train_{m}']:.3f}" for m in self.task.metric_names}
        post |= {
            "nstep": f"{rec['fwd_nstep']:.1f}" if deq else "unrolled",
            "res": f"{rec['fwd_residual']:.1e}" if deq else "-",
        }
        if self.skipped:
            post["skipped"] = str(self.skipped)
        bar.set_postfix(post, refresh=False)

    def _add_to_sums(self, rec: dict[str, Any]) -> None:
        """Count one step's record into the epoch statistics."""
        sums = self.epoch_sums
        if rec.get("skipped", False):
            sums["skipped"] += 1
            return
        n = rec["n"]
        for m in self.task.metric_names:
            sums[m] = sums.get(m, 0.0) + rec[f"train_{m}"] * n
        sums["n"] += n
        sums["scaler_skipped"] += float(rec.get("scaler_skipped", 0))
        if rec["stage"] == "deq" and math.isfinite(rec["fwd_nstep"]):
            sums["nstep"] += rec["fwd_nstep"] * n
            sums["res"] += rec["fwd_residual"] * n
            sums["conv"] += rec["fwd_converged"] * n
            sums["deq_n"] += n

    def _epoch_summary(self, t_epoch: float) -> dict[str, Any]:
        """The epoch's training statistics from its sums (``t_epoch``: its start time)."""
        sums = self.epoch_sums
        n = max(sums["n"], 1.0)
        deq_n = sums["deq_n"]
        first, *rest = self.task.metric_names  # the loss is NaN when no step counted
        out = {
            f"train_{first}": sums.get(first, 0.0) / n if sums["n"] else math.nan,
            **{f"train_{m}": sums.get(m, 0.0) / n for m in rest},
            "fwd_nstep": sums["nstep"] / deq_n if deq_n else math.nan,
            "fwd_residual": sums["res"] / deq_n if deq_n else math.nan,
            "fwd_converged": sums["conv"] / deq_n if deq_n else math.nan,
            "epoch_time_s": time.perf_counter() - t_epoch - sums["monitor_time"],
            **({"monitor_time_s": sums["monitor_time"]} if self.monitor is not None else {}),
            **({"scaler_skipped_steps": sums["scaler_skipped"]} if self.amp.scaling else {}),
        }
        if self.config.train.on_nonfinite == "skip":
            out["skipped_steps"] = int(sums["skipped"])
        return out

    def _announce_resume(self) -> None:
        """One line when a resumed run's epoch count changed: how the schedule continues."""
        old, new = self._saved_epochs, self.config.train.epochs
        if old != new and self.dist.is_main:
            verb = "extending" if new > old else "shortening"
            how = replan_note(
                self.config.optim,
                self.steps_per_epoch,
                old_epochs=old,
                new_epochs=new,
                step=self.step,
            )
            print(
                f"phantomdeq: {verb} the run in {str(self.out_dir)!r} from {old} to {new} "
                f"epochs; {how}",
                file=sys.stderr,
            )

    def _draw_curves(self) -> None:
        """``curves.png`` from ``metrics.jsonl`` (rank 0, ``log.plot``); never raises."""
        path = self.out_dir / "metrics.jsonl"
        if not (self.dist.is_main and self.config.log.plot and path.is_file()):
            return
        try:
            plot_curves(path, self.out_dir / "curves.png")
        except Exception as exc:  # a plot must never hide the training outcome
            print(f"phantomdeq: could not draw curves.png: {exc}", file=sys.stderr)

    def _report(self, rec: dict[str, Any], seconds: float) -> None:
        if not self.progress:
            return
        parts = [
            f"epoch {rec['epoch']}/{self.config.train.epochs}",
            f"loss {rec['train_loss']:.4f}",
        ]
        if "test_n" in rec:
            parts += self.task.describe(rec)
            if math.isfinite(rec["test_fwd_nstep"]):  # a model with DEQ info
                parts.append(f"fwd steps {rec['test_fwd_nstep']:.1f}")
                parts.append(f"res {rec['test_fwd_residual']:.2e}")
        if rec.get("skipped_steps"):
            parts.append(f"skipped {rec['skipped_steps']} steps")
        parts.append(f"{seconds:.1f}s")
        print("  ".join(parts), file=sys.stderr)

    def _final_metrics(self) -> dict[str, Any]:
        ev = self.last_eval
        fwd_nstep = math.nan
        path = self.out_dir / "metrics.jsonl"
        if self.dist.is_main and path.is_file():
            rows = [
                r
                for r in read_metrics(path)
                if r.get("kind") == "step" and r.get("stage") == "deq" and not r.get("skipped")
            ]
            vals = [r["fwd_nstep"] for r in rows if isinstance(r.get("fwd_nstep"), int | float)]
            if vals:
                fwd_nstep = float(np.mean(vals))
        primary = f"test_{self.task.primary}"
        return {
            primary: ev.get(primary, math.nan),
            f"best_{primary}": math.nan if self.best is None else self.best,
            **{
                f"test_{m}": ev.get(f"test_{m}", math.nan)
                for m in self.task.metric_names
                if m != self.task.primary
            },
            "test_fwd_nstep": ev.get("test_fwd_nstep", math.nan),
            "test_fwd_residual": ev.get("test_fwd_residual", math.nan),
            "test_fwd_converged": ev.get("test_fwd_converged", math.nan),
            "fwd_nstep": fwd_nstep,
            "epochs": self.epoch,
            "steps": self.step,
            "skipped_steps": self.skipped,
            "time_s": self.elapsed,
            "time_per_step_s": self.train_time / max(self.step, 1),
            "out_dir": str(self.out_dir),
        }
