"""Seeded, stratified subsampling and fraction splits of label arrays.

Per-class sizes are proportional to the class frequencies and add up to the requested size
exactly (largest-remainder rounding; ties broken by the seeded generator). Within a class the
images are drawn by a seeded permutation. Indices come back sorted.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

# Each step draws from its own stream, so changing one split's size never moves another split.
Stage = Literal["carve-test", "carve-val", "train", "val", "test", "trainval"]
_STAGE_IDS: dict[str, int] = {
    "carve-test": 1,
    "carve-val": 2,
    "train": 3,
    "val": 4,
    "test": 5,
    "trainval": 6,
}


def rng_for(seed: int, stage: Stage) -> np.random.Generator:
    """An independent generator for one step of the split pipeline."""
    return np.random.default_rng([int(seed), _STAGE_IDS[stage]])


def allocate(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``size`` across classes in proportion to ``counts`` (exact total, never above a count).

    Args:
        counts: images available per class.
        size: total to draw, at most ``counts.sum()``.
        rng: breaks ties between equal remainders.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not 0 <= size <= total:
        raise ValueError(f"size {size} outside [0, {total}]")
    if total == 0:
        return np.zeros_like(counts)
    base = counts * size // total
    remainder = counts * size % total  # fractional part, in units of 1/total
    missing = size - int(base.sum())
    order = np.lexsort((rng.random(len(counts)), -remainder))
    base[order[:missing]] += 1
    return base


def stratified_subsample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-proportional sample of exactly ``size`` items (sorted)."""
    labels = np.asarray(labels, dtype=np.int64)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    per_class = allocate(counts, size, rng)
    chosen = [
        rng.permutation(np.flatnonzero(inverse == c))[:k]
        for c, k in enumerate(per_class.tolist())
        if k
    ]
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen))


def stratified_split(
    labels: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, carved) with exactly ``size`` carved, stratified by label."""
    carved = stratified_subsample(labels, size, rng)
    mask = np.ones(len(labels), dtype=bool)
    mask[carved] = False
    return np.flatnonzero(mask), carved
