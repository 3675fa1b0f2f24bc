"""`ImageDataset`: records plus a transform, as a torch `Dataset`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from vprompt.data.records import ImageRecords
from vprompt.data.transforms import to_rgb


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Yields ``(image, label)``: a (C, H, W) float tensor from ``transform`` and an int.

    Random augmentation draws from torch's generator; DataLoader seeds each worker from its
    own base seed, so pass ``generator=torch.Generator().manual_seed(s)`` to the DataLoader
    for repeatable epochs (the result then depends on ``num_workers`` as well).
    """

    def __init__(
        self,
        records: ImageRecords,
        transform: Callable[[Image.Image], torch.Tensor],
        class_names: list[str],
    ) -> None:
        self.records = records
        self.transform = transform
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.records.load(i)), int(self.records.labels[i])

    @property
    def targets(self) -> list[int]:
        """The label of every item (for samplers and class counts)."""
        return self.records.labels.tolist()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image(self, i: int) -> Image.Image:
        """Item ``i`` as an RGB PIL image, before resizing and normalisation."""
        return to_rgb(self.records.load(i))

    def class_counts(self) -> list[int]:
        """Number of items per class."""
        return self.records.class_counts(self.num_classes).tolist()
