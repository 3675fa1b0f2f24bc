"""Resumable, rank-aware data order and per-image seeded augmentation.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, cut into global batches;
each process takes a contiguous chunk of every global batch. Random augmentation of an image is
seeded from ``(seed, epoch, index)``. So the images a step sees, and how they are augmented, do
not depend on the number of processes, on DataLoader workers or on where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

_MIX = 1_000_003


def mix_seed(seed: int, *parts: int) -> int:
    """``seed`` and ``parts`` mixed into one torch seed (below 2**63 it is the plain formula,
    so existing runs keep their numbers; larger seeds wrap instead of overflowing)."""
    value = seed
    for part in parts:
        value = value * _MIX + part
    return value % 2**63


def global_batches(
    n: int, batch_size: int, seed: int, epoch: int, world: int = 1
) -> list[list[int]]:
    """The global batches of one epoch, shuffled by ``seed + epoch``.

    The last, incomplete batch is kept unless it has fewer than ``max(2, world)`` images (the
    head's BatchNorm needs two, and every process needs one).
    """
    g = torch.Generator().manual_seed(mix_seed(seed, epoch))
    order = torch.randperm(n, generator=g).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < batch_size and len(batches[-1]) < max(2, world):
        batches.pop()
    return batches


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch (see `global_batches`)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= max(2, world) else 0)


def local_chunk(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch (sizes differ by at most one)."""
    base, extra = divmod(len(batch), world)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (1 if rank < extra else 0)]


class EpochBatches:
    """Batch sampler yielding ``(epoch, index)`` pairs of this process, from a given step on."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
    ) -> None:
        self.batches = global_batches(n, batch_size, seed, epoch, world)[start_step:]
        self.epoch, self.rank, self.world = epoch, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in self.batches:
            yield [(self.epoch, i) for i in local_chunk(b, self.rank, self.world)]


class SeededItems(Dataset):
    """Wraps a dataset so item ``(epoch, i)`` is drawn with torch's RNG seeded from both.

    Without random augmentation it just returns ``dataset[i]`` (no RNG work at all). The global
    RNG state of the caller is left untouched either way.
    """

    def __init__(self, dataset: Dataset, seed: int, random: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.random = random

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, i = key
        if not self.random:
            return self.dataset[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, i))
            return self.dataset[i]


def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous index range of ``n`` items this process evaluates."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
