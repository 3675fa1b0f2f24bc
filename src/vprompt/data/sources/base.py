"""What every dataset source returns, and checks they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vprompt.data.records import ImageRecords
from vprompt.errors import DataError


@dataclass(frozen=True)
class SourceSplits:
    """The full pools a source provides, before carving and subsampling.

    Attributes:
        class_names: one name per class index.
        train: the training pool (always present).
        val: the validation pool, or None if the source has none (it is then carved from train).
        test: the test pool, or None if the source has none (it is then carved from train).
        trainval: an explicit train+val pool (VTAB's ``train800val200.txt``), if the source has one.
        layout: a one-line description of what was found, for logs.
    """

    class_names: list[str]
    train: ImageRecords
    val: ImageRecords | None = None
    test: ImageRecords | None = None
    trainval: ImageRecords | None = None
    layout: str = ""

    def pools(self) -> dict[str, ImageRecords]:
        """The pools that exist, by split name."""
        named = {"train": self.train, "val": self.val, "test": self.test, "trainval": self.trainval}
        return {k: v for k, v in named.items() if v is not None}


def require_dir(path: Path, what: str) -> None:
    """Raise `DataError` unless ``path`` is an existing folder."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; check the path in the dataset spec.")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder; check the path in the dataset spec.")


def require_file(path: Path, what: str) -> None:
    """Raise `DataError` unless ``path`` is an existing file."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; check the path in the dataset spec.")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a file; check the path in the dataset spec.")


def read_class_names(path: Path) -> list[str]:
    """Read ``classes.txt``: one class name per line, line order = class index."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read class names from {path} ({e}); it must be UTF-8 text.") from e
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError(f"{path} lists no class names; write one name per line or delete it.")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path} repeats class names {dup}; each line must name a different class.")
    return names


def parse_int_label(text: str, where: str, num_classes: int | None) -> int:
    """Parse an integer label and check it lies in [0, num_classes).

    Args:
        text: the label as written.
        where: file and line, for the message.
        num_classes: the number of classes if known (from ``classes.txt``).
    """
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{where}: label {text!r} is not an integer class index.") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else "0 or more"
        raise DataError(
            f"{where}: label {label} is out of range; labels must be {bound}"
            + (" (the number of lines in classes.txt)." if num_classes is not None else ".")
        )
    return label
