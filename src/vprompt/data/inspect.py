"""A picture of a dataset: sample images per class in a grid (for ``vprompt data inspect``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vprompt._paths import make_dir
from vprompt.data.dataset import ImageDataset
from vprompt.errors import ConfigError, DataError

CELL_INCHES = 1.1


def sample_indices(
    dataset: ImageDataset, per_class: int, seed: int = 0, max_classes: int | None = None
) -> list[list[int]]:
    """Per class (up to ``max_classes``), up to ``per_class`` seeded random item indices."""
    labels = dataset.records.labels
    rng = np.random.default_rng(seed)
    classes = range(
        dataset.num_classes if max_classes is None else min(max_classes, dataset.num_classes)
    )
    rows = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        take = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else idx
        rows.append(sorted(take.tolist()))
    return rows


def save_grid(
    dataset: ImageDataset,
    out: Path,
    per_class: int = 8,
    seed: int = 0,
    max_classes: int | None = 30,
    title: str = "",
) -> Path:
    """Write a PNG with one row per class (labelled) of unnormalised sample images.

    Args:
        dataset: the split to show; images are drawn before resizing and normalisation.
        out: the PNG path (parent folders are created).
        per_class: images per row.
        seed: which images are drawn.
        max_classes: show at most this many classes (the first ones); None for all.
        title: figure title.

    Returns:
        The file written (``out``, with ``.png`` added when it has no suffix).

    Raises:
        DataError: ``out`` is a folder or has a suffix matplotlib cannot write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(out).expanduser()  # as `make_dir` does: '~/grid.png' quoted past the shell
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give an image file, such as {out / 'grid.png'}")
    formats = FigureCanvasBase.get_supported_filetypes()
    if not out.suffix:
        out = out.with_suffix(".png")
    elif out.suffix.lower().lstrip(".") not in formats:
        raise DataError(
            f"--out {out}: cannot write {out.suffix} images; use one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    rows = sample_indices(dataset, per_class, seed, max_classes)
    n_rows, n_cols = max(len(rows), 1), max(per_class, 1)
    label_width = 0.12 * max((len(n) for n in dataset.class_names[: len(rows)]), default=4)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(label_width + n_cols * CELL_INCHES, 0.5 + n_rows * CELL_INCHES),
        squeeze=False,
    )
    for r, indices in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(indices):
                img = np.asarray(dataset.image(indices[c]))
                small = max(img.shape[:2]) < 64
                ax.imshow(img, interpolation="nearest" if small else "antialiased")
        axes[r][0].set_ylabel(
            dataset.class_names[r], rotation=0, ha="right", va="center", fontsize=10
        )
    if len(rows) < dataset.num_classes:
        title = f"{title}  (first {len(rows)} of {dataset.num_classes} classes)".strip()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    make_dir(out.parent, "--out folder")
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:  # a folder at that path, a read-only file system...
        raise ConfigError(
            f"--out {out} cannot be written ({e.strerror or e}); give a .png file path"
        ) from None
    finally:
        plt.close(fig)
    return out
