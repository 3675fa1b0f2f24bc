"""Where converted weights live, and how they are written (atomically) and read back."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vprompt._atomic import atomic_write, remove_stale_temps

CACHE_ENV = "VPROMPT_CACHE"


def cache_dir() -> Path:
    """The vprompt cache: ``$VPROMPT_CACHE``, else ``$XDG_CACHE_HOME/vprompt``, else ``~/.cache/vprompt``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vprompt"


def write_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader never sees a half-written file, and two writers racing leave one complete file.
    Temporary files of earlier writers that were killed (weights-sized) are removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    # a shared cache must stay readable by others whatever the umask
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata), mode=0o644)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header ({} when there is none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
