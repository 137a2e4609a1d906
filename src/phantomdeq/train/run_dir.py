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
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no folder lock
    fcntl = None  # type: ignore[assignment]

from .atomic import output_write_error, sweep_temp_files
from .config import ConfigError

__all__ = [
    "LOCK_FILE",
    "OUTPUT_FILES",
    "RUN_FILES",
    "RunFolder",
    "RunFolderError",
    "lock_run_folder",
    "prepare_run_folder",
]

#: files whose presence means a folder holds a run
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt")
#: everything a run writes (what ``overwrite`` deletes)
OUTPUT_FILES = (*RUN_FILES, "curves.png", "tensorboard")
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
