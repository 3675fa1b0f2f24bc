"""Shared fixtures: a tiny PNG image dataset on disk and tiny random backbone specs.

Everything here is offline and fast: the dataset is generated once per session, the backbones
are random-weight timm models a few thousand parameters big.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_VIT = "timm:vit_tiny_patch16_224?pretrained=false&img_size=32&depth=2&embed_dim=32&num_heads=2"
"""A 2-block ViT with width 32 at 32 px (2 x 2 patches); random weights, builds in milliseconds."""

TINY_CLASSES = ("red", "green", "blue")
TINY_SPLIT_SIZES = {"train": 8, "val": 4, "test": 4}
"""Images per class in each split of `tiny_image_folder`."""


def _make_image(rng: np.random.Generator, cls: int, size: int = 24) -> Image.Image:
    """A noisy image whose dominant colour channel is the class (learnable in a few steps)."""
    img = rng.integers(0, 90, size=(size, size, 3), dtype=np.int64)
    img[..., cls] += 120 + rng.integers(0, 40)
    # a class-dependent stripe so the class is not only a colour
    if cls == 1:
        img[::4] = 255
    elif cls == 2:
        img[:, ::4] = 255
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def write_image_folder(root: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``root/{train,val,test}/<class>/<i>.png`` real PNG files and return ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in (sizes or TINY_SPLIT_SIZES).items():
        for c, name in enumerate(TINY_CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _make_image(rng, c).save(d / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class PNG dataset: 8 / 4 / 4 images per class in train / val / test (read-only)."""
    return write_image_folder(tmp_path_factory.mktemp("tiny_images"))


@pytest.fixture(scope="session")
def tiny_data_spec(tiny_image_folder: Path) -> str:
    """``folder:`` spec of `tiny_image_folder`."""
    return f"folder:{tiny_image_folder}"


@pytest.fixture(scope="session")
def tiny_vit_spec() -> str:
    """Backbone spec of a tiny random ViT."""
    return TINY_VIT


@pytest.fixture
def single_thread():
    """Run torch on one thread for the test (tiny models on a busy 2-core machine are 10x faster
    that way); the previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a ``python -m vprompt`` subprocess: offline, one thread per process."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env
