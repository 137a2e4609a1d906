"""The run folder (``--out``): never clobbered, never left half-made.

* A folder holding a run (any of :data:`RUN_FILES`) is refused unless the run is continued
  (``resume``) or explicitly replaced (``overwrite``, which deletes the files a run writes --
  :data:`OUTPUT_FILES` -- and nothing else, and reports them).
* A path that exists and is not a folder is refused, and so is a path under a file
  (``--out notes.txt/run``).
* A folder that cannot be created or written (read-only file system, no permission, disk
  full) is refused on one line naming the folder, the cause and what to do, before anything
  in it changes.
* One process at a time: the folder is locked (``fcntl.flock`` on :data:`LOCK_FILE`, held
  until :meth:`RunFolder.release` or the process's end, a kill included) before anything in
  it is deleted; a folder locked by another process (a run still going, an orphaned worker of
  a killed ``phantomdeq ablate``) is refused, naming that process.
* Temporary files left by a killed writer (``.last.pt.<random>.tmp`` ...) are removed.
* :meth:`RunFolder.discard` removes the folders that :func:`prepare_run_folder` created, for a
  run that fails before training starts.

Errors are :class:`RunFolderError` (a :class:`~phantomdeq.train.config.ConfigError`, so the
command line reports them on one line with exit status 2).

Atomic file replacement for everything a run writes (checkpoints, ``metrics.jsonl`` rewrites,
``config.yaml``).

:func:`atomic_write` writes to a temporary file ``.<name>.<random>.tmp`` in the destination
folder, flushes and ``fsync``-s it, moves it into place with ``os.replace`` (atomic on POSIX
file systems) and ``fsync``-s the folder, so a reader or a process killed at any point sees
either the old file or the new one, never a mixture. The temporary file is created with mode
``0o666`` filtered by the process umask -- the permissions ``open()`` would give the file --
unlike ``tempfile.mkstemp``'s ``0o600``, which hides checkpoints from the group sharing a
project folder. A kill can leave a temporary file behind; :func:`sweep_temp_files` removes them
when a run starts.

A write that the environment refuses (disk full, a file-size limit, a quota, a read-only file
system, no permission) raises :class:`OutputWriteError` -- an ``OSError`` whose message names the
file, the cause in words and what to do -- also when the ``OSError`` reaches it wrapped in another
exception (``torch.save`` reports a failed write as ``RuntimeError: [enforce fail at
inline_container.cc...]``, the ``OSError`` only in its context). The destination is unchanged.

Atomic, self-describing, hashed training checkpoints.

A checkpoint is a ``torch.save`` mapping with the model, optimiser and scheduler states, every
random-number-generator state that the training loop consumes (torch CPU, CUDA when present,
Python ``random``, NumPy), the resolved config and the position (``epoch`` completed epochs,
``batch`` batches done in the next epoch, ``step`` optimiser steps). Writes go through
:func:`phantomdeq.train.run_folder.atomic_write` (temporary file, ``fsync``, ``os.replace``), so a
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

Putting a checkpoint's weights into a freshly built model, with one-line errors.

``load_state_dict`` on a checkpoint of another architecture lists every mismatching tensor (49
lines for MDEQ-Tiny); :func:`load_model_weights` instead names the config keys that differ
between the checkpoint's stored config and the requested one, with a count and the first
example of the tensors that differ. :func:`check_finite_weights` refuses weights holding NaN or
inf, naming the tensor.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import secrets
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import (
    RESUMABLE_TRAIN_KEYS,
    Config,
    ConfigError,
    config_differences,
    config_from_dict,
    config_to_dict,
)
from .guard import nonfinite_entries

__all__ = [
    "write_checkpoints",
    "saved_best",
    "resume_point",
    "restore_objects",
    "check_saved_config",
    "check_resumable",
    "adopt_best",
    "ResumePoint",
    "dump_config",
    "CheckpointError",
    "FORMAT",
    "LOCK_FILE",
    "OUTPUT_FILES",
    "OutputWriteError",
    "RUN_FILES",
    "RunFolder",
    "RunFolderError",
    "UnverifiedCheckpointWarning",
    "atomic_write",
    "capture_rng_state",
    "check_finite_weights",
    "content_hash",
    "find_os_error",
    "load_checkpoint",
    "load_model_weights",
    "lock_run_folder",
    "output_write_error",
    "prepare_run_folder",
    "restore_rng_state",
    "save_checkpoint",
    "sweep_temp_files",
    "temp_name",
]


# --- the folder -------------------------------------------------------------------------------

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no folder lock
    fcntl = None  # type: ignore[assignment]


#: files whose presence means a folder holds a run
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt")
#: everything a run writes (what ``overwrite`` deletes)
OUTPUT_FILES = (*RUN_FILES, "curves.png", "tensorboard", "vocab.json")
#: the vocabulary of a language-model run (written when the data set has one)
VOCAB_FILE = "vocab.json"
#: the lock file of a folder in use (it holds the pid of the process using the folder)
LOCK_FILE = ".phantomdeq.lock"


class RunFolderError(ConfigError):
    """The run folder cannot be used as asked (exists as a file, holds another run, ...)."""


@dataclass
class RunFolder:
    """A prepared run folder: ``created`` lists the folders made for it (outermost first),
    ``removed`` the old run's files deleted by ``overwrite``."""

    path: Path
    created: list[Path] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    lock: IO[str] | None = None

    def release(self) -> None:
        """Unlock the folder (closing the lock file releases the ``flock``)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def discard(self) -> None:
        """Delete the folders this run created (for a run that failed during setup)."""
        self.release()
        if not self.created:
            return
        shutil.rmtree(self.created[0], ignore_errors=True)
        self.created = []


def existing_run_files(path: Path) -> list[str]:
    """Which of :data:`RUN_FILES` are present in ``path``."""
    return [name for name in RUN_FILES if (path / name).exists()]


def check_run_folder(path: str | Path, *, resume: bool, overwrite: bool) -> list[str]:
    """Refuse what :func:`prepare_run_folder` refuses, without changing anything; returns the
    run files already present."""
    path = Path(path)
    if resume and overwrite:
        raise RunFolderError(
            f"--resume and --overwrite exclude each other: --resume continues the run in "
            f"{str(path)!r}, --overwrite deletes it and starts afresh"
        )
    if path.exists() and not path.is_dir():
        raise RunFolderError(
            f"--out: {str(path)!r} is a file, not a folder; give a folder path "
            f"(created when missing)"
        )
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise RunFolderError(
            f"--out: {str(path)!r} lies under {str(blocker)!r}, which is a file, not a folder; "
            f"give a folder path (created when missing)"
        )
    found = existing_run_files(path) if path.is_dir() else []
    if found and not resume and not overwrite:
        raise RunFolderError(
            f"--out: folder {str(path)!r} already holds a run ({', '.join(found)}); continue "
            f"it with --resume or delete it and start afresh with --overwrite"
        )
    return found


def lock_run_folder(path: Path) -> IO[str] | None:
    """Lock the existing folder ``path`` for this process (an exclusive, non-blocking
    ``flock`` on :data:`LOCK_FILE`, which then holds this pid); the returned open file holds
    the lock until it is closed or the process ends. Refused with :class:`RunFolderError`
    when another process holds it. None where ``fcntl`` is missing (not POSIX)."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fh = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the run's lifetime
    except OSError as exc:
        raise _unwritable(path, exc) from exc
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise RunFolderError(
            f"--out: folder {str(path)!r} is in use by another process (pid {holder}); wait "
            f"for it to end or stop it, then resume"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
    except OSError as exc:
        fh.close()
        raise _unwritable(path, exc) from exc
    return fh


def _unwritable(path: Path, exc: OSError) -> RunFolderError:
    """The one-line refusal of a folder that cannot be created or written."""
    return RunFolderError(
        f"--out: {output_write_error(path, exc, 'write in folder')}; nothing in it was changed"
    )


def prepare_run_folder(path: str | Path, *, resume: bool, overwrite: bool) -> RunFolder:
    """Check ``path`` (:func:`check_run_folder`), create and lock the folder
    (:func:`lock_run_folder`), delete the old run's files when ``overwrite`` and sweep stale
    temporary files. Call :meth:`RunFolder.release` when the run ends."""
    path = Path(path)
    found = check_run_folder(path, resume=resume, overwrite=overwrite)
    folder = RunFolder(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        made = [p for p in reversed(missing) if p.is_dir()]
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        raise RunFolderError(f"--out: {output_write_error(path, exc, 'create folder')}") from exc
    folder.created = list(reversed(missing))
    try:
        folder.lock = lock_run_folder(path)
    except RunFolderError:
        folder.discard()
        raise
    try:
        if overwrite and found:
            for name in OUTPUT_FILES:
                target = path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                    folder.removed.append(name + "/")
                elif target.exists() or target.is_symlink():
                    target.unlink()
                    folder.removed.append(name)
        sweep_temp_files(path, RUN_FILES)
    except OSError as exc:
        folder.release()
        gone = f"; deleted so far: {', '.join(folder.removed)}" if folder.removed else ""
        raise RunFolderError(
            f"--out: {output_write_error(path, exc, 'delete files in folder')}{gone}"
        ) from exc
    return folder


# --- atomic writes ----------------------------------------------------------------------------

#: what each environment failure means for a file a run writes, and what to do about it
_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space there"),
    errno.EFBIG: (
        "file too large for the file-size limit (ulimit -f) or the file system",
        "raise the limit or write elsewhere",
    ),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EROFS: ("read-only file system", "give a writable --out"),
    errno.EACCES: ("permission denied", "make the folder writable or give another --out"),
    errno.EPERM: ("operation not permitted", "make the folder writable or give another --out"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "give a folder path"),
    errno.EIO: ("input/output error", "check the disk"),
}


class OutputWriteError(OSError):
    """A file of a run could not be written because of the environment (disk full, read-only,
    no permission ...). ``str()`` is one line naming the file, the cause and what to do; the
    original error is ``__cause__``, its number ``errno``, the file ``filename``."""

    def __init__(self, message: str, *, code: int | None = None, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.errno = code  # type: ignore[assignment]
        self.filename = path

    def __str__(self) -> str:
        return self.message


def find_os_error(exc: BaseException) -> OSError | None:
    """``exc`` itself when it is an ``OSError``, else the first ``OSError`` in its chain of
    causes and contexts (``torch.save`` hides a failed write in a ``RuntimeError``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def output_write_error(
    path: str | Path, error: OSError, action: str = "write", note: str = ""
) -> OutputWriteError:
    """The :class:`OutputWriteError` for ``error`` met while doing ``action`` on ``path``
    (``note`` is added in parentheses after what to do)."""
    if isinstance(error, OutputWriteError):
        return error
    code = error.errno
    cause, todo = _CAUSES.get(code or -1, ("", "check the folder"))
    name = errno.errorcode.get(code or -1, "")
    detail = error.strerror or str(error) or type(error).__name__
    why = f"{cause} ({name}: {detail})" if cause else (f"{name}: {detail}" if name else detail)
    return OutputWriteError(
        f"cannot {action} {str(path)!r}: {why}; {todo}{f' ({note})' if note else ''}",
        code=code,
        path=str(path),
    )


def temp_name(path: Path) -> Path:
    """A fresh temporary name next to ``path``: ``.<name>.<16 hex digits>.tmp``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Context manager yielding a file object; on a normal exit its content replaces ``path``
    atomically, on an exception (or a ``KeyboardInterrupt``) ``path`` is left untouched and the
    temporary file is removed; an ``OSError`` (also one wrapped in another exception) is raised
    as :class:`OutputWriteError`. ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = temp_name(path)
    note = f"{path.name} is unchanged" if path.exists() else ""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise output_write_error(path, exc, note=note) from exc
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        found = find_os_error(exc) if isinstance(exc, Exception) else None
        if found is not None:
            raise output_write_error(path, found, note=note) from exc
        raise
    _fsync_dir(path.parent)


def sweep_temp_files(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Remove temporary files ``.<name>.*.tmp`` left in ``folder`` by a killed writer, for each
    of ``names``; returns the removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for name in names:
        for p in folder.glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


# --- checkpoint files -------------------------------------------------------------------------

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


# --- a checkpoint's weights into a model ------------------------------------------------------


def _architecture_keys(stored: Config, requested: Config) -> list[str]:
    """Config keys that differ and decide the model's tensors: ``model.*`` and the data set
    (input channels, classes)."""
    return [
        k
        for k in config_differences(stored, requested)
        if k.startswith("model") or k in ("data.name", "data.image_size")
    ]


def load_model_weights(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    *,
    source: str,
    stored: Config | None = None,
    requested: Config | None = None,
) -> None:
    """``model.load_state_dict(weights)`` or a one-line :class:`CheckpointError` naming
    ``source`` (the checkpoint file), the differing config keys when ``stored`` and ``requested``
    configs are given, and the mismatching tensors (count and first example)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if not (missing or unexpected or reshaped):
        try:
            model.load_state_dict(dict(weights))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else ""
            raise CheckpointError(
                f"checkpoint {source!r} does not load into the model: {first}"
            ) from exc
        return
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} tensor(s) differ in shape, e.g. {k!r}: "
            f"{list(weights[k].shape)} in the checkpoint, {list(own[k].shape)} in the model"
        )
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint, e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model, e.g. {unexpected[0]!r}")
    detail = "; ".join(parts)
    keys = _architecture_keys(stored, requested) if stored and requested else []
    if keys:
        raise CheckpointError(
            f"checkpoint {source!r} holds another model than the one requested: "
            f"{', '.join(keys)} differ(s) from the checkpoint's config ({detail}); "
            f"drop those --set overrides"
        )
    name = (
        (requested.model.name or requested.model.target)
        if requested is not None
        else type(model).__name__
    )
    raise CheckpointError(
        f"checkpoint {source!r} does not match the model {name!r} built from its config ({detail})"
    )


def check_finite_weights(model: nn.Module, *, source: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN/inf (one line naming ``source``)."""
    bad = nonfinite_entries(model)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(
            f"checkpoint {source!r} holds non-finite values (NaN/inf) in {bad[0]!r}{more}; "
            f"it is a diverged model and cannot be evaluated, use an earlier checkpoint"
        )


def write_vocab(out_dir: Path, vocab: dict[str, Any]) -> None:
    """Write a run's vocabulary (a ``to_dict()`` of :class:`phantomdeq.data.CharVocab`) to
    :data:`VOCAB_FILE`, atomically."""
    with atomic_write(out_dir / VOCAB_FILE, "w") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
        fh.write("\n")


def read_vocab(out_dir: Path) -> dict[str, Any] | None:
    """The vocabulary saved in ``out_dir`` (None when the run has none); an unreadable file
    raises :class:`phantomdeq.data.DataError` naming it."""
    from phantomdeq.data import DataError

    path = out_dir / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{str(path)!r}: cannot read the run's vocabulary ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{str(path)!r}: expected a mapping, got {type(data).__name__}")
    return data


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable by :func:`~.config.load_config`), atomically."""
    import yaml

    with atomic_write(path, "w") as fh:
        fh.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --- resuming a run ----------------------------------------------------------------------------
#
# Where ``--resume`` starts (:func:`resume_point`), nothing lost:
#
# * from ``last.pt``;
# * without it, from ``best.pt`` (said in a notice): it holds the same complete state as the
#   ``last.pt`` written with it, so the run continues bit for bit from that epoch; the records
#   after it in ``metrics.jsonl`` are dropped and trained again, and ``train.epochs`` may not be
#   below the epochs the history records;
# * with neither, from the beginning only when ``metrics.jsonl`` records at most one finished
#   epoch (what a run killed before its first checkpoint leaves: the first epoch's record is
#   written just before its checkpoint) and the config matches the folder's ``config.yaml``
#   (:func:`check_saved_config`), so that the records dropped are trained again as they were;
#   otherwise the resume is refused, nothing changed, with what to do.
#
# A ``best.pt`` written by another model (a config that differs beyond what a resume may change)
# is refused rather than overwritten (:func:`adopt_best`), and a checkpoint without its hash is
# loaded with an "unverified" note.


@dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from: its ``path``, loaded ``state``, the epochs
    ``metrics.jsonl`` records (``train.epochs`` may not go below them when resuming from
    ``best.pt``) and a note to print once every check has passed."""

    path: Path
    state: dict[str, Any]
    history_epochs: int = 0
    announce: str = ""


def saved_best(state: dict[str, Any]) -> float | None:
    """The best evaluation value of the task's primary metric a checkpoint holds (None: no
    evaluation yet); checkpoints written before tasks hold the accuracy as ``best_acc``, -1
    for none."""
    if "best_metric" in state:
        value = state["best_metric"]
        return None if value is None else float(value)
    legacy = float(state.get("best_acc", -1.0))
    return legacy if legacy >= 0 else None


def resume_point(
    out_dir: Path,
    *,
    device: torch.device,
    history: Callable[[], int],
    note: Callable[[str], None],
) -> ResumePoint | None:
    """``last.pt``, else ``best.pt``, else None (start from the beginning); refused with a
    :class:`RunFolderError` when neither is there but ``metrics.jsonl`` records (``history()``)
    more than one trained epoch. ``note`` reports an unverified checkpoint."""
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    if last.is_file():
        return ResumePoint(last, load_checkpoint(last, map_location=device, on_unverified=note))
    epochs = history()
    best_problem = ""
    if best.is_file():
        try:
            state = load_checkpoint(best, map_location=device, on_unverified=note)
        except CheckpointError as exc:
            best_problem = f" and its best.pt is unreadable ({exc})"
        else:
            epoch, step = int(state["epoch"]), int(state["step"])
            later = (
                f"; the records after it in metrics.jsonl (to epoch {epochs}) are dropped "
                f"and trained again"
                if epochs > epoch
                else ""
            )
            return ResumePoint(
                best,
                state,
                history_epochs=epochs,
                announce=f"no last.pt in {str(out_dir)!r}; resuming from best.pt, the "
                f"complete state after epoch {epoch} (step {step}){later}",
            )
    if epochs > 1:  # a kill before the first checkpoint leaves one epoch at most
        raise RunFolderError(
            f"--resume: {str(out_dir)!r} has no last.pt{best_problem or ' nor best.pt'} "
            f"to continue from, but its metrics.jsonl records {epochs} trained epoch(s); "
            f"starting over would lose them, so nothing was changed: put the run's last.pt "
            f"(or best.pt) back, or start afresh with --overwrite"
        )
    return None


def check_saved_config(out_dir: Path, config: Config) -> None:
    """Refuse to restart a run with a config that differs from its ``config.yaml`` beyond
    what a resume may change (an unreadable ``config.yaml`` is not checked)."""
    path = out_dir / "config.yaml"
    try:
        import yaml

        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        saved = config_from_dict(raw)
    except Exception:  # missing or unreadable: nothing to compare with
        return
    differ = [k for k in config_differences(saved, config) if k != "train.epochs"]
    if differ:
        raise ConfigError(
            f"cannot resume the run in {str(out_dir)!r} (no checkpoint yet): the "
            f"config differs from its config.yaml in {', '.join(differ)}; resume with "
            f"that config, or start afresh with this one with --overwrite"
        )


def check_resumable(point: ResumePoint, config: Config, out_dir: Path) -> Config:
    """The config the checkpoint was written with, after checking that ``config`` may
    continue it: the same config but for what a resume may change, and ``train.epochs`` not
    below what the checkpoint (and the history) has trained."""
    path, state = point.path, point.state
    saved = config_from_dict(state["config"])
    differ = [k for k in config_differences(saved, config) if k != "train.epochs"]
    if differ:
        allowed = ", ".join(f"train.{k}" for k in RESUMABLE_TRAIN_KEYS)
        raise ConfigError(
            f"cannot resume from {str(path)!r}: the config differs from the checkpoint's in "
            f"{', '.join(differ)} (only log.*, train.monitor_*, {allowed} and a larger "
            f"train.epochs may change on resume)"
        )
    epochs = config.train.epochs
    epoch, batch = int(state["epoch"]), int(state.get("batch", 0))
    if epochs < epoch or (epochs == epoch and batch > 0):
        raise ConfigError(
            f"train.epochs: the run in {str(out_dir)!r} has already trained "
            f"{epoch} epoch(s){' and part of the next' if batch else ''}; to extend it, "
            f"set at least {epoch + (1 if batch else 0)}, got {epochs}"
        )
    if epochs < point.history_epochs:
        raise ConfigError(
            f"train.epochs: the run in {str(out_dir)!r} has already trained "
            f"{point.history_epochs} epoch(s) (metrics.jsonl); to extend it, set at least "
            f"{point.history_epochs}, got {epochs}"
        )
    return saved


def restore_objects(
    point: ResumePoint,
    *,
    saved: Config,
    config: Config,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    extra_state: dict[str, Any],
) -> None:
    """Load the checkpoint's model weights (finite), optimiser, ``extra_state`` objects and
    schedule, and restore its RNG streams."""
    path, state = point.path, point.state
    load_model_weights(net, state["model"], source=str(path), stored=saved, requested=config)
    check_finite_weights(net, source=str(path))
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the optimiser state does not match the model "
            f"({' '.join(str(exc).split())})"
        ) from exc
    extra = state.get("extra", {})
    for name, obj in extra_state.items():
        if name not in extra:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has no saved {name!r} state; resume it with the "
                f"settings it was written with"
            )
        obj.load_state_dict(extra[name])
    schedule.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])


def adopt_best(
    out_dir: Path,
    config: Config,
    best: float | None,
    better: Callable[[float, float | None], bool],
    *,
    note: Callable[[str], None],
    is_main: bool,
) -> float | None:
    """The best value of the run: that of the model in ``best.pt`` when ``better`` than
    ``best`` -- a kill between writing ``best.pt`` and ``last.pt`` leaves ``best.pt`` one epoch
    ahead (the invariant of :func:`write_checkpoints`); None when ``best.pt`` is unreadable (it
    is replaced at the next evaluation). A ``best.pt`` of another model is refused."""
    path = out_dir / "best.pt"
    if not path.is_file():
        return best
    try:
        state = load_checkpoint(path, map_location="cpu", on_unverified=note)
    except CheckpointError as exc:
        if is_main:
            print(f"phantomdeq: {exc}; it is replaced at the next evaluation", file=sys.stderr)
        return None
    try:
        differ = [
            k
            for k in config_differences(config_from_dict(state["config"]), config)
            if k != "train.epochs"
        ]
    except ConfigError as exc:
        differ = [f"a config that does not load ({exc})"]
    if differ:
        raise RunFolderError(
            f"--resume: {str(path)!r} holds another model (its config differs from this "
            f"run's in {', '.join(differ)}); this run would overwrite it with its own best "
            f"model: move it out of {str(out_dir)!r} (or delete it), then resume"
        )
    value = saved_best(state)
    if value is not None and better(value, best):
        return value
    return best


def write_checkpoints(out_dir: Path, state: dict[str, Any], *, best: bool) -> None:
    """Write ``best.pt`` (when ``best``) and then ``last.pt``: best first, so that a kill
    between the two leaves ``best.pt`` ahead, never behind (see :func:`adopt_best`)."""
    if best:
        save_checkpoint(out_dir / "best.pt", state)
    save_checkpoint(out_dir / "last.pt", state)
