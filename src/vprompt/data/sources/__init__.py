"""Dataset sources: each turns a parsed spec into full train / val / test pools."""

from __future__ import annotations

from collections.abc import Callable

from vprompt.data.sources.base import SourceSplits
from vprompt.data.sources.csv import load_csv
from vprompt.data.sources.digits import load_digits_source
from vprompt.data.sources.fashion_mnist import load_fashion_mnist
from vprompt.data.sources.folder import load_folder
from vprompt.data.sources.vtab import load_vtab
from vprompt.data.specs import DataSpec

_LOADERS: dict[str, Callable[[DataSpec], SourceSplits]] = {
    "folder": load_folder,
    "vtab": load_vtab,
    "csv": load_csv,
    "builtin:fashion-mnist": load_fashion_mnist,
    "builtin:digits": load_digits_source,
}


def load_source(spec: DataSpec) -> SourceSplits:
    """The full pools of the dataset a spec names."""
    key = f"builtin:{spec.target}" if spec.kind == "builtin" else spec.kind
    return _LOADERS[key](spec)


__all__ = ["SourceSplits", "load_source"]
