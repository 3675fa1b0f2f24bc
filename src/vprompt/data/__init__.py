"""Datasets from spec strings, with transforms from the backbone's pretrained preprocessing.

>>> splits = build_splits("builtin:digits", img_size=32, train_size=100, seed=0)
>>> image, label = splits.train[0]  # (3, 32, 32) float tensor, int
"""

from vprompt.data.dataset import ImageDataset
from vprompt.data.records import ArrayStore, FileLoader, ImageLoader, ImageRecords
from vprompt.data.sources import SourceSplits, load_source
from vprompt.data.specs import BUILTIN_NAMES, SPEC_KINDS, DataSpec, parse_data_spec
from vprompt.data.splits import DEFAULT_FRACTIONS, DataSplits, build_splits
from vprompt.data.subsample import rng_for, stratified_split, stratified_subsample
from vprompt.data.transforms import AUGMENTS, Augment, build_transform, to_rgb

__all__ = [
    "AUGMENTS",
    "BUILTIN_NAMES",
    "DEFAULT_FRACTIONS",
    "SPEC_KINDS",
    "ArrayStore",
    "Augment",
    "DataSpec",
    "DataSplits",
    "FileLoader",
    "ImageDataset",
    "ImageLoader",
    "ImageRecords",
    "SourceSplits",
    "build_splits",
    "build_transform",
    "load_source",
    "parse_data_spec",
    "rng_for",
    "stratified_split",
    "stratified_subsample",
    "to_rgb",
]
