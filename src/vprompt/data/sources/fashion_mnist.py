"""``builtin:fashion-mnist``: the idx files of Debian's ``dataset-fashion-mnist`` package.

Labels are read when the source is built (70 kB); pixels are read on the first image access
in each process, and only the rows the final splits use (see `IdxImageStore`).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from vprompt.data.records import ImageRecords, Source
from vprompt.data.sources.base import SourceSplits
from vprompt.data.specs import DataSpec
from vprompt.errors import DataError

# Where `apt-get install dataset-fashion-mnist` puts the files; read at call time (tests patch it).
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "VPROMPT_DATA"

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CHUNK_ROWS = 4096


def load_fashion_mnist(spec: DataSpec) -> SourceSplits:
    """The official 60k train and 10k test pools (val is carved from train by the caller)."""
    folder = find_fashion_mnist()
    pools = {split: _read_split(folder, *names) for split, names in FILES.items()}
    return SourceSplits(
        list(CLASS_NAMES),
        pools["train"],
        test=pools["test"],
        layout=f"Fashion-MNIST idx files in {folder}",
    )


def candidate_dirs() -> list[Path]:
    """Folders searched, in order: ``$VPROMPT_DATA/fashion-mnist``, ``$VPROMPT_DATA``, Debian's."""
    dirs: list[Path] = []
    if env := os.environ.get(ENV_VAR):
        base = Path(env).expanduser()
        dirs += [base / "fashion-mnist", base]
    dirs.append(DEBIAN_DIR)
    return dirs


def find_fashion_mnist() -> Path:
    """The first candidate folder holding all four idx files (gzipped or not).

    Raises:
        DataError: none does; the message names the Debian package and the environment variable.
    """
    dirs = candidate_dirs()
    for d in dirs:
        if all(_idx_file(d, name) is not None for pair in FILES.values() for name in pair):
            return d
    looked = ", ".join(str(d) for d in dirs)
    wanted = ", ".join(f"{n}[.gz]" for pair in FILES.values() for n in pair)
    raise DataError(
        f"Fashion-MNIST not found (looked in {looked} for {wanted}). Install it with "
        f"`apt-get install dataset-fashion-mnist` (files land in {DEBIAN_DIR}), or put the four "
        f"idx files in a folder and set the environment variable {ENV_VAR} to it."
    )


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _read_split(folder: Path, images_name: str, labels_name: str) -> ImageRecords:
    images_path, labels_path = _idx_file(folder, images_name), _idx_file(folder, labels_name)
    assert images_path is not None and labels_path is not None
    store = IdxImageStore(images_path)
    labels = read_idx_labels(labels_path)
    if len(labels) != store.num_rows:
        raise DataError(
            f"{labels_path} has {len(labels)} labels but {images_path} has {store.num_rows} "
            "images; the files are from different sets or damaged. Reinstall them."
        )
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(f"{labels_path} holds labels >= {len(CLASS_NAMES)}; the file is damaged.")
    return ImageRecords(tuple(range(store.num_rows)), labels, store, origin=str(images_path))


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def read_idx_header(path: Path) -> tuple[tuple[int, ...], int]:
    """Shape and byte offset of the data in an unsigned-byte idx file."""
    try:
        with _open(path) as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[:3] != b"\x00\x00\x08" or magic[3] == 0:
                raise DataError(
                    f"{path} is not an unsigned-byte idx file (magic {magic.hex()}); reinstall it."
                )
            ndim = magic[3]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"Cannot read idx file {path} ({e}); reinstall it.") from e
    return tuple(dims), 4 + 4 * ndim


def read_idx_labels(path: Path) -> np.ndarray:
    """All labels of a 1-D idx file as int64."""
    shape, offset = read_idx_header(path)
    if len(shape) != 1:
        raise DataError(f"{path} has shape {shape}; a label file is 1-D. Reinstall it.")
    try:
        with _open(path) as f:
            data = f.read()[offset:]
    except (OSError, EOFError) as e:
        raise DataError(f"Cannot read idx file {path} ({e}); reinstall it.") from e
    if len(data) < shape[0]:
        raise DataError(f"{path} is truncated ({len(data)} of {shape[0]} labels); reinstall it.")
    return np.frombuffer(data[: shape[0]], dtype=np.uint8).astype(np.int64)


class IdxImageStore:
    """Rows of a (N, H, W) idx image file, read on first access and only those selected.

    The array is dropped when pickled, so spawned DataLoader workers read their own copy
    instead of receiving it through a pipe.
    """

    def __init__(self, path: Path, rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        shape, self._offset = read_idx_header(self.path)
        if len(shape) != 3:
            raise DataError(f"{path} has shape {shape}; an image file is (N, H, W). Reinstall it.")
        self.num_rows, self._h, self._w = shape
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_rows if self.rows is None else len(self.rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def load(self, source: Source) -> Image.Image:
        if self._images is None:
            self._images = self._read()
        return Image.fromarray(self._images[int(source)])

    def name(self, source: Source) -> str:
        row = int(source) if self.rows is None else int(self.rows[int(source)])
        return f"{self.path}[{row}]"

    def check(self, source: Source) -> str | None:
        return None if 0 <= int(source) < len(self) else "index out of range"

    def select(self, rows: np.ndarray) -> IdxImageStore:
        rows = np.asarray(rows, dtype=np.int64)
        new = object.__new__(IdxImageStore)
        new.__dict__.update(self.__dict__)
        new.rows = rows if self.rows is None else self.rows[rows]
        new._images = None
        return new

    def _read(self) -> np.ndarray:
        rows = np.arange(self.num_rows) if self.rows is None else self.rows
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        out = np.empty((len(rows), self._h, self._w), dtype=np.uint8)
        row_bytes = self._h * self._w
        try:
            with _open(self.path) as f:
                f.read(self._offset)
                pos = 0  # index into `wanted`
                for start in range(0, self.num_rows, _CHUNK_ROWS):
                    stop = min(start + _CHUNK_ROWS, self.num_rows)
                    hi = np.searchsorted(wanted, stop)
                    if pos == hi:
                        f.seek(f.tell() + (stop - start) * row_bytes)
                        continue
                    buf = f.read((stop - start) * row_bytes)
                    if len(buf) != (stop - start) * row_bytes:
                        raise EOFError(f"file ends before row {stop}")
                    chunk = np.frombuffer(buf, dtype=np.uint8).reshape(-1, self._h, self._w)
                    out[order[pos:hi]] = chunk[wanted[pos:hi] - start]
                    pos = hi
                    if pos == len(wanted):
                        break
        except (OSError, EOFError) as e:
            raise DataError(
                f"Cannot read images from {self.path} ({e}); reinstall the file."
            ) from e
        return out
