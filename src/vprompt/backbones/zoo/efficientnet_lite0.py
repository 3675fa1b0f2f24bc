"""EfficientNet-Lite0 (lukemelas ``EfficientNet-PyTorch`` naming) -> timm ``tf_efficientnet_lite0``.

The source is a plain state dict whose 296 tensors come in the same module order as timm's
``tf_efficientnet_lite0`` (``_conv_stem`` -> ``conv_stem``, ``_bn0`` -> ``bn1``,
``_blocks.N._expand_conv`` -> ``blocks.S.I.conv_pw``, ..., ``_fc`` -> ``classifier``). The
conversion pairs them by position and checks each pair: the same tensor role (``weight``,
``bias``, ``running_mean``, ...) and the same shape. Both implementations use TensorFlow "same"
padding and BatchNorm eps 1e-3, so the logits equal the reference implementation's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from vprompt.backbones.checkpoint import StateDict, read_checkpoint
from vprompt.errors import BackboneError

ARCH = "tf_efficientnet_lite0"


def rename_in_order(
    source: StateDict,
    template: dict[str, torch.Tensor],
    what: str,
    progress: Callable[[str, int, int], None] | None = None,
) -> StateDict:
    """Give the i-th source tensor the i-th template name, checking role and shape pairwise.

    Args:
        source: the checkpoint, in its stored order.
        template: the target state dict (its tensors may be on the meta device).
        what: names the source in errors.
        progress: called as ``progress(description, done, total)``.
    """
    src_items, dst_items = list(source.items()), list(template.items())
    if len(src_items) != len(dst_items):
        raise BackboneError(
            f"{what} has {len(src_items)} tensors but timm {ARCH} has {len(dst_items)}; "
            "the checkpoint is not an EfficientNet-Lite0 state dict."
        )
    out: StateDict = {}
    problems: list[str] = []
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src_items, dst_items, strict=True)):
        if sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1] or tuple(sv.shape) != tuple(dv.shape):
            problems.append(f"#{i} {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}")
        out[dk] = sv.detach().clone().contiguous()
        if progress is not None:
            progress("renaming tensors", i + 1, len(src_items))
    if problems:
        raise BackboneError(
            f"{what} does not pair up in order with timm {ARCH} ({len(problems)} pairs differ "
            f"in role or shape): {'; '.join(problems[:5])}"
        )
    return out


def convert_efficientnet_lite0(
    src: Path, progress: Callable[[str, int, int], None] | None = None
) -> StateDict:
    """Convert the packaged lukemelas checkpoint to a timm ``tf_efficientnet_lite0`` state dict.

    The 1000-class ImageNet classifier is kept (``classifier.weight``, ``classifier.bias``).
    """
    import timm

    source = read_checkpoint(src)
    with torch.device("meta"):
        template = timm.create_model(ARCH, pretrained=False).state_dict()
    return rename_in_order(source, template, str(src), progress)
