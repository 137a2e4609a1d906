"""Warm-started fixed points (``train.warm_start: true``): each training sample's last
equilibrium, kept between epochs and used as the start of its next forward solve.

The store holds, per sample index of the training set and per part of the (tuple) state, the
solution ``h*`` of the sample's last DEQ-stage step, rounded to bfloat16 (half the memory of
float32, float32's range), on the training device or -- for a CUDA run with
``train.warm_start_memory: pinned`` -- in pinned CPU memory. A sample never solved starts from
zeros, the model's usual start. The estimators keep their meaning: the solve still runs to the
solver's tolerance and every gradient is attached to the returned solution (UPG unrolls from it,
IFT/NPG linearise at it), whatever the start. The store is part of the checkpoint
(``extra["warm_start"]``), so a resumed run starts its solves exactly where the uninterrupted
run would have.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["WarmStartStore"]

STORE_DTYPE = torch.bfloat16


class WarmStartStore:
    """``num_samples`` equilibria, keyed by sample index (allocated at the first :meth:`put`,
    when the state's shapes are known)."""

    def __init__(
        self, num_samples: int, device: torch.device, *, pinned: bool = False, announce: bool = True
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(
                f"WarmStartStore: num_samples must be an integer >= 1, got {num_samples!r}"
            )
        self.num_samples = num_samples
        self.pinned = pinned and device.type == "cuda"
        self.device = torch.device("cpu") if self.pinned else device
        self.announce = announce
        self.parts: list[Tensor] | None = None
        self.seen = torch.zeros(num_samples, dtype=torch.bool, device=self.device)

    # ------------------------------------------------------------------ memory
    @property
    def nbytes(self) -> int:
        if self.parts is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self.parts) + self.seen.numel()

    def _allocate(self, shapes: Sequence[torch.Size]) -> None:
        self.parts = [
            torch.zeros(
                (self.num_samples, *s),
                dtype=STORE_DTYPE,
                device=self.device,
                pin_memory=self.pinned,
            )
            for s in shapes
        ]
        if self.announce:
            where = "pinned CPU memory" if self.pinned else str(self.device)
            values = sum(math.prod(s) for s in shapes)
            print(
                f"phantomdeq: train.warm_start keeps {self.num_samples} equilibria of "
                f"{values} values in bfloat16 on {where}: {self.nbytes / 2**20:.1f} MiB",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ use
    def get(
        self,
        indices: Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> tuple[Tensor, ...] | None:
        """The stored states of ``indices`` (zeros for samples never stored) in ``dtype`` on
        ``device`` (default: the store's); None before the first :meth:`put`."""
        if self.parts is None:
            return None
        idx = self._index(indices)
        dev = self.device if device is None else device
        return tuple(p[idx].to(dev, dtype, non_blocking=True) for p in self.parts)

    def put(self, indices: Tensor, state: Sequence[Tensor]) -> None:
        """Store ``state`` (a tuple of ``(B, ...)`` tensors) for the samples ``indices``, rounded
        to bfloat16 (a non-finite entry -- a sample the solve had to freeze -- as 0)."""
        parts = tuple(state)
        if self.parts is None:
            self._allocate([t.shape[1:] for t in parts])
        stored = self.parts
        if stored is None or len(parts) != len(stored):
            raise ValueError(
                f"WarmStartStore.put: expected a state of {0 if stored is None else len(stored)} "
                f"parts, got {len(parts)}"
            )
        idx = self._index(indices)
        for p, t in zip(stored, parts):
            if t.shape[1:] != p.shape[1:] or t.shape[0] != idx.numel():
                raise ValueError(
                    f"WarmStartStore.put: state part of shape {tuple(t.shape)} does not match "
                    f"{idx.numel()} indices and stored shape {tuple(p.shape[1:])}"
                )
            finite = torch.nan_to_num(t.detach(), nan=0.0, posinf=0.0, neginf=0.0)
            p[idx] = finite.to(self.device, STORE_DTYPE)  # a blocking copy: read at once
        self.seen[idx] = True

    def _index(self, indices: Tensor) -> Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long).to(self.device)
        if idx.dim() != 1 or (
            idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples)
        ):
            raise IndexError(
                f"WarmStartStore: indices must be a 1-d list in [0, {self.num_samples}), got "
                f"shape {tuple(idx.shape)}"
            )
        return idx

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "parts": None if self.parts is None else [p.cpu() for p in self.parts],
            "seen": self.seen.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"WarmStartStore: the checkpoint holds {state['num_samples']} samples, this run "
                f"has {self.num_samples}"
            )
        parts: list[Tensor] | None = state["parts"]
        self.parts = None
        if parts is not None:
            self._allocate([p.shape[1:] for p in parts])
            mine: list[Tensor] = self.parts or []
            for dst, saved in zip(mine, parts):
                dst.copy_(saved)
        self.seen = state["seen"].to(self.device).clone()
