"""Finding a config's data directory (``data.root``) from the places a user may mean."""

from __future__ import annotations

from pathlib import Path

from .sections import ConfigError

__all__ = ["resolve_data_root"]


def _repo_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / "pyproject.toml").is_file() or (d / ".git").exists():
            return d
    return None


def resolve_data_root(root: str, *, config_dir: Path | None = None) -> Path:
    """Find the data directory ``root``.

    An absolute path must exist. A relative one is tried against the working directory, the
    config file's directory, the repository root (found above the config file, the working
    directory or this package) and the repository's parent (so ``../shared/data/mnist-t10k``
    and ``shared/data/mnist-t10k`` both find a ``shared`` folder next to the repository).
    Raises :class:`ConfigError` naming ``data.root`` and every path tried.
    """
    p = Path(root).expanduser()
    if p.is_absolute():
        if p.is_dir():
            return p
        raise ConfigError(f"data.root: directory {str(p)!r} does not exist")
    bases: list[Path] = [Path.cwd()]
    if config_dir is not None:
        bases.append(config_dir)
    for start in (config_dir, Path.cwd(), Path(__file__).resolve().parent):
        if start is None:
            continue
        repo = _repo_root(start)
        if repo is not None:
            bases += [repo, repo.parent]
    tried: list[str] = []
    for base in bases:
        cand = (base / p).resolve()
        if str(cand) in tried:
            continue
        tried.append(str(cand))
        if cand.is_dir():
            return cand
    raise ConfigError(f"data.root: directory {root!r} not found (tried: {', '.join(tried)})")
