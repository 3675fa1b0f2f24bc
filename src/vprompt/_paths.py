"""Output folders: checked before long work starts, created with a clear error when they cannot
be (a file where a folder should be, no permission), never with an OSError traceback."""

from __future__ import annotations

import os
from pathlib import Path

from vprompt.errors import ConfigError


def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_dir_target(path: str | os.PathLike, what: str) -> None:
    """Refuse a folder path that cannot be created (or written) without touching anything.

    Args:
        path: the folder to be created (it may exist).
        what: how the user gave it, for the message (``"--out"``, ``"task directory"``).

    Raises:
        ConfigError: a file sits on the path, or the nearest existing folder is not writable.
    """
    path = Path(path).expanduser()
    existing = _first_existing(path)
    if not existing.is_dir():
        where = f"{what} {path}" if existing == path else f"{what} {path}: {existing}"
        raise ConfigError(f"{where} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{what} {path}: no permission to write in {existing}; choose another path"
        )


def make_dir(path: str | os.PathLike, what: str) -> Path:
    """``mkdir -p`` whose failures are a `ConfigError` naming the path and the reason."""
    path = Path(path).expanduser()
    check_dir_target(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{what} {path} cannot be created ({e.strerror or e}); choose another path"
        ) from None
    return path
