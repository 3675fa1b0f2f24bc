"""Image transforms built from a backbone's pretrained preprocessing (`DataConfig`)."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vprompt.backbones.base import DataConfig
from vprompt.errors import DataError

Augment = Literal["none", "flip-crop"]
AUGMENTS: tuple[str, ...] = get_args(Augment)

# VPT's FGVC recipe resizes to 256 before a 224 crop (448 -> 512, 384 -> 438): img_size / 0.875.
FLIP_CROP_RESIZE_RATIO = 0.875

_INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
    "lanczos": InterpolationMode.LANCZOS,
}


# EXIF tag 0x0112: how a camera's stored pixels must be turned to show the scene upright
_EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: turned and mirrored by its EXIF orientation tag (phone
    and camera photos store the sensor's pixels and say in the tag how to turn them). Images
    without the tag, or with the tag at 1 (upright), are returned as they are."""
    if img.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
        return img
    return ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as upright 3-channel RGB ('L', 'P', 'RGBA', 'CMYK', 16-bit 'I;16' ...).

    The EXIF orientation is applied first (`upright`), as viewers and Hugging Face's
    ``load_image`` do. Alpha is dropped (as torchvision's and timm's loaders do). Grayscale
    beyond 8 bits is rescaled by its mode, never by its pixel values (so a dark and a bright
    image of the same kind scale alike): integer modes (``I;16*``, ``I``: 16-bit PNG and TIFF
    data) map 0..65535 to 0..255, float ``F`` maps 0..1 to 0..255; values outside are clipped.
    """
    img = upright(img)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if img.mode == "F" else arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning
    return img.convert("RGB")


class ToRGB:
    """Transform wrapper around `to_rgb` (a class, so datasets pickle for spawned workers)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def interpolation_mode(name: str) -> InterpolationMode:
    """Map a timm interpolation name to torchvision's enum.

    Raises:
        DataError: the name is not one of nearest, bilinear, bicubic, box, hamming, lanczos.
    """
    try:
        return _INTERPOLATIONS[name.lower()]
    except KeyError:
        valid = ", ".join(_INTERPOLATIONS)
        raise DataError(
            f"Unknown interpolation {name!r} in the data config; valid: {valid}."
        ) from None


def build_transform(
    data_config: DataConfig | None = None,
    img_size: int | None = None,
    augment: Augment = "none",
    train: bool = False,
) -> T.Compose:
    """Preprocessing for one split: RGB -> resize (-> augment) -> tensor -> normalize.

    ``augment="none"`` (every eval split, and train unless asked): direct resize to
    ``img_size x img_size`` (VTAB style, aspect ratio not kept, ``crop_pct`` ignored).
    ``augment="flip-crop"`` with ``train=True`` (VPT's FGVC train recipe): resize to
    ``int(img_size / 0.875)`` square, random ``img_size`` crop, horizontal flip with p=0.5.
    Eval splits always use the direct resize, so a task's inference preprocessing depends only on
    the data config and the image size.

    Args:
        data_config: the backbone's mean, std and interpolation; ImageNet defaults if None.
        img_size: output side in pixels; ``data_config.img_size`` if None.
        augment: ``"none"`` or ``"flip-crop"``.
        train: whether this is the training split (augmentation applies only there).
    """
    cfg = data_config or DataConfig()
    size = int(img_size or cfg.img_size)
    if size <= 0:
        raise DataError(f"img_size must be a positive number of pixels, got {size}.")
    if augment not in AUGMENTS:
        raise DataError(f"Unknown augment {augment!r}; valid: {', '.join(AUGMENTS)}.")
    if len(cfg.mean) != 3 or len(cfg.std) != 3:
        raise DataError(
            f"The data config has {len(cfg.mean)} mean and {len(cfg.std)} std values; vprompt feeds "
            "3-channel RGB images, so give 3 of each."
        )
    interp = interpolation_mode(cfg.interpolation)
    ops: list = [ToRGB()]
    if augment == "flip-crop" and train:
        resize = int(size / FLIP_CROP_RESIZE_RATIO)
        ops += [
            T.Resize((resize, resize), interpolation=interp),
            T.RandomCrop(size),
            T.RandomHorizontalFlip(p=0.5),
        ]
    else:
        ops.append(T.Resize((size, size), interpolation=interp))
    ops += [T.ToTensor(), T.Normalize(mean=list(cfg.mean), std=list(cfg.std))]
    return T.Compose(ops)
