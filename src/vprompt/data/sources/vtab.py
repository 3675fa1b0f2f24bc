"""``vtab:PATH``: a VTAB-1k task folder with list files ``relative/path label``."""

from __future__ import annotations

from pathlib import Path

from vprompt.data.records import FILE_LOADER, ImageRecords
from vprompt.data.sources.base import SourceSplits, parse_int_label, read_class_names, require_dir
from vprompt.data.specs import DataSpec
from vprompt.errors import DataError

LIST_FILES: dict[str, str] = {
    "train": "train800.txt",
    "val": "val200.txt",
    "test": "test.txt",
    "trainval": "train800val200.txt",
}
REQUIRED = ("train", "val", "test")

VTAB_LAYOUT = (
    "a VTAB-1k task folder holds train800.txt, val200.txt, test.txt (and train800val200.txt for "
    "merge_train_val), each line 'relative/path/to/image label' with paths relative to the "
    "folder, plus an optional classes.txt with one class name per line"
)


def load_vtab(spec: DataSpec) -> SourceSplits:
    """Read the VTAB-1k list files under ``spec.path``."""
    root = spec.path
    require_dir(root, "VTAB folder")
    for split in REQUIRED:
        if not (root / LIST_FILES[split]).is_file():
            raise DataError(f"VTAB folder {root} lacks {LIST_FILES[split]}; {VTAB_LAYOUT}.")
    classes_file = root / "classes.txt"
    names = read_class_names(classes_file) if classes_file.is_file() else None
    num = len(names) if names is not None else None
    pools = {
        split: read_list(root / file, root, num)
        for split, file in LIST_FILES.items()
        if split in REQUIRED or (root / file).is_file()
    }
    if names is None:
        top = max(int(r.labels.max()) for r in pools.values())
        names = [str(i) for i in range(top + 1)]
    layout = f"VTAB lists {', '.join(LIST_FILES[s] for s in pools)} at {root}"
    return SourceSplits(
        names, pools["train"], pools["val"], pools["test"], pools.get("trainval"), layout=layout
    )


def read_list(path: Path, root: Path, num_classes: int | None) -> ImageRecords:
    """Parse one list file; paths are relative to ``root``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read list file {path} ({e}); {VTAB_LAYOUT}.") from e
    pairs: list[tuple[str, int]] = []
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(
                f"{path}:{lineno}: expected 'relative/path label', got {text!r}; {VTAB_LAYOUT}."
            )
        label = parse_int_label(parts[1], f"{path}:{lineno}", num_classes)
        pairs.append((str(root / parts[0]), label))
    if not pairs:
        raise DataError(f"List file {path} names no images; {VTAB_LAYOUT}.")
    return ImageRecords.from_pairs(pairs, FILE_LOADER, origin=str(path))
