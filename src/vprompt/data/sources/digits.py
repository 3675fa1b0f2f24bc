"""``builtin:digits``: scikit-learn's 1,797 8x8 handwritten digits (no official splits)."""

from __future__ import annotations

import numpy as np

from vprompt.data.records import ArrayStore, ImageRecords
from vprompt.data.sources.base import SourceSplits
from vprompt.data.specs import DataSpec
from vprompt.errors import DataError

CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))


def load_digits_source(spec: DataSpec) -> SourceSplits:
    """All images as the train pool; the caller carves val and test by seeded fractions."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError(
            "builtin:digits needs scikit-learn; install it with `pip install scikit-learn` "
            "(or `pip install vprompt[datasets]`)."
        ) from e
    bunch = load_digits()
    # Pixel values are 0..16; scale to 0..255 so the images look and normalise like 8-bit ones.
    images = np.rint(np.asarray(bunch.images) * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    store = ArrayStore(images, "sklearn-digits")
    records = ImageRecords(tuple(range(len(images))), bunch.target, store, origin="sklearn digits")
    return SourceSplits(
        list(CLASS_NAMES), records, layout="scikit-learn load_digits (1,797 images)"
    )
