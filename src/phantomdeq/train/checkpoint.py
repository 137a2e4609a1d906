"""Atomic, self-describing, hashed training checkpoints.

A checkpoint is a ``torch.save`` mapping with the model, optimiser and scheduler states, every
random-number-generator state that the training loop consumes (torch CPU, CUDA when present,
Python ``random``, NumPy), the resolved config and the position (``epoch`` completed epochs,
``batch`` batches done in the next epoch, ``step`` optimiser steps). Writes go through
:func:`phantomdeq.train.atomic.atomic_write` (temporary file, ``fsync``, ``os.replace``), so a
crash never leaves a half-written ``last.pt`` / ``best.pt``; files get the permissions of an
ordinary ``open()`` (``0o666`` minus the umask).

Integrity: :func:`save_checkpoint` stores ``sha256``, a hash of every value in the mapping
(:func:`content_hash`: each tensor's dtype, shape and bytes and every other value's ``repr``,
walked in sorted key order), and :func:`load_checkpoint` recomputes it, so a file whose weights
were changed after it was written (bit rot, a partial copy, an edited tensor) is refused with a
:class:`CheckpointError` naming the file. A checkpoint without a ``sha256`` entry (written
before hashes existed, or the entry was removed) still loads, *unverified*: with an
:class:`UnverifiedCheckpointWarning`, or a call of ``on_unverified`` with the message (the
commands print it as a ``phantomdeq:`` note). Loading uses ``weights_only=True`` (no code runs
from a file).

Crash-consistency invariant of a run folder (the trainer writes ``best.pt`` *before*
``last.pt`` whenever an epoch improves the best test accuracy): after a kill at any instant,

* ``last.pt`` and ``best.pt`` are each a complete checkpoint (old or new version, never torn);
* ``best.pt`` is never older than the best accuracy ``last.pt`` records
  (``last.pt["best_acc"] <= best.pt["best_acc"]``);
* if ``best.pt`` is newer than ``last.pt`` (the kill fell between the two writes), it holds the
  epoch that ``--resume`` replays next; the trainer then adopts its accuracy as the best so far,
  so ``best.pt`` always holds the model whose accuracy the run reports as ``best_test_acc``.

Every checkpoint the trainer writes holds finite parameters and buffers only (checked before
each save), so "the last checkpoint" is always a finite one.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write

__all__ = [
    "FORMAT",
    "CheckpointError",
    "UnverifiedCheckpointWarning",
    "capture_rng_state",
    "content_hash",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

#: format tag stored in every checkpoint; bumped on incompatible changes
FORMAT = "phantomdeq-checkpoint-v1"
REQUIRED_KEYS = ("format", "model", "optimizer", "scheduler", "rng", "config", "epoch", "step")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupted or of another format."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint has no ``sha256`` entry: it loaded, but nothing shows it is unchanged."""


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states as tensors / plain Python values (``weights_only`` loadable)."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _feed(h: Any, path: str, value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach()
        h.update(f"T|{path}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            flat = t.cpu().contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().data)
    elif isinstance(value, Mapping):
        h.update(f"D|{path}|{len(value)}\n".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, f"{path}/{key!r}", value[key])
    elif isinstance(value, list | tuple):
        h.update(f"L|{path}|{type(value).__name__}|{len(value)}\n".encode())
        for i, item in enumerate(value):
            _feed(h, f"{path}[{i}]", item)
    else:
        h.update(f"V|{path}|{type(value).__name__}|{value!r}\n".encode())


def content_hash(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint mapping without its ``sha256`` entry: every tensor's path,
    dtype, shape and bytes and every other value's path, type and ``repr``, in sorted key order
    (so it does not depend on dict order or tensor storage layout)."""
    h = hashlib.sha256()
    _feed(h, "", {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` with the format tag and its :func:`content_hash` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **{k: v for k, v in state.items() if k != "sha256"}}
    payload["sha256"] = content_hash(payload)
    with atomic_write(path, "wb") as fh:
        torch.save(payload, fh)
    return path


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    on_unverified: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Read and check a checkpoint; raises :class:`CheckpointError` naming the file.

    A checkpoint without its ``sha256`` entry loads unverified: ``on_unverified`` is called
    with a one-line message saying so, or, without it, an :class:`UnverifiedCheckpointWarning`
    is issued."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted or not a phantomdeq checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} has format {found!r}; expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is incomplete: missing {', '.join(missing)}"
        )
    recorded = state.get("sha256")
    if recorded is None:
        message = (
            f"checkpoint {str(path)!r} has no sha256 hash (written before hashes existed, or "
            f"the entry was removed): loaded unverified, a change since it was written would "
            f"go unnoticed"
        )
        if on_unverified is not None:
            on_unverified(message)
        else:
            warnings.warn(message, UnverifiedCheckpointWarning, stacklevel=2)
    elif recorded != content_hash(state):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: its content does not match the sha256 hash "
            f"recorded when it was written (changed or corrupted since); use another checkpoint"
        )
    return state
