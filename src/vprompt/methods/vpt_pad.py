"""VPT-pad: VPT's ConvNet variant (Jia et al., ECCV 2022, Sec. 4 and appendix, "prompt: pad").

A CNN has no token sequence to prepend prompts to, so VPT puts its prompts in the input space
itself: a frame of learnable pixels, ``prompt_len`` wide on every side, around each (resized)
image. The frozen backbone sees an image ``img_size + 2 * prompt_len`` pixels wide::

    tb = prompt_tb          # (1, 3, 2p, s + 2p): the top p rows, then the bottom p rows
    lr = prompt_lr          # (1, 3, s, 2p):      the left p columns, then the right p columns
    x  = cat(lr[..., :p], image, lr[..., p:])      along the width   -> (B, 3, s, s + 2p)
    x  = cat(tb[:, :, :p], x, tb[:, :, p:])        along the height  -> (B, 3, s + 2p, s + 2p)

As in the official code (``src/models/resnet.py``, ``_setup_prompt_pad``), ``init='uniform'``
draws the prompt pixels uniformly in [0, 1), raw pixel values that go through the backbone's
input normalisation ((v - mean) / std) at every forward, like the image they surround;
``init='normal'`` draws standard-normal values used as they are (the official "gaussian").
The prompts do not depend on the input; they are 12 p (s + p) numbers (13,740 for p = 5 at
224 px). Their shapes follow the backbone's input size s, which a task stores (and checks on
loading) as its image size, so the method has no size option of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from timm.layers import PatchEmbed
from torch import nn

from vprompt.backbones.base import Backbone
from vprompt.errors import ConfigError
from vprompt.methods.base import Method, MethodConfig, check_at_least, check_choice, is_vit
from vprompt.methods.registry import register_method

__all__ = ["PadInit", "VPTPad", "VPTPadConfig"]

PadInit = Literal["uniform", "normal"]
"""``uniform``: pixel values in [0, 1), normalised like the image at every forward (official
"random"). ``normal``: standard-normal values used without normalisation (official "gaussian")."""


@dataclass
class VPTPadConfig(MethodConfig):
    """VPT-pad (VPT's ConvNet variant): a learnable frame of pixels around every input image.

    Attributes:
        prompt_len: width of the frame on each side, in pixels (the official ``NUM_TOKENS``,
            default 5).
        init: how the prompt pixels start (see `PadInit`).
    """

    name: ClassVar[str] = "vpt-pad"
    prompt_len: int = 5
    init: PadInit = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "prompt_len", 1)
        check_choice(self, "init", PadInit)


@register_method
class VPTPad(Method):
    """Learnable pixels around the image, then the frozen backbone (see the module docstring)."""

    config_class = VPTPadConfig
    config: VPTPadConfig

    def __init__(
        self,
        config: VPTPadConfig,
        backbone: nn.Module,
        *,
        img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        """Built by `attach` (through `for_backbone`), which knows the backbone's input size
        ``img_size`` and its normalisation ``mean`` / ``std``."""
        super().__init__(config, backbone)
        tokenised = is_vit(backbone) or any(isinstance(m, PatchEmbed) for m in backbone.modules())
        if tokenised or hasattr(backbone, "patch_embed"):
            raise ConfigError(
                f"vpt-pad is VPT's ConvNet variant: it makes the input 2 x prompt_len pixels "
                f"larger, which {type(backbone).__name__} (its patch embedding is built for one "
                "input size) does not take; for transformers use 'vpt-shallow' or 'vpt-deep'"
            )
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(
                f"vpt-pad frames 3-channel images; the backbone's preprocessing has "
                f"{len(mean)} mean values"
            )
        self.img_size = int(img_size)
        p, s = config.prompt_len, self.img_size
        self.prompt_tb = nn.Parameter(torch.empty(1, 3, 2 * p, s + 2 * p))
        self.prompt_lr = nn.Parameter(torch.empty(1, 3, s, 2 * p))
        normalise = config.init == "uniform"
        self.register_buffer(
            "mean",
            torch.tensor(mean if normalise else (0.0,) * 3).view(1, 3, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "std", torch.tensor(std if normalise else (1.0,) * 3).view(1, 3, 1, 1), persistent=False
        )
        for t in (self.prompt_tb, self.prompt_lr):
            if normalise:
                nn.init.uniform_(t, 0.0, 1.0)
            else:
                nn.init.normal_(t)

    @classmethod
    def for_backbone(cls, config: MethodConfig, backbone: Backbone) -> VPTPad:
        assert isinstance(config, VPTPadConfig)
        cfg = backbone.data_config
        return cls(config, backbone.model, img_size=backbone.img_size, mean=cfg.mean, std=cfg.std)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, s, s) -> framed images (B, 3, s + 2p, s + 2p)."""
        s, p = self.img_size, self.config.prompt_len
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ConfigError(
                f"vpt-pad frames images of shape (B, 3, {s}, {s}), the size it was trained at; "
                f"got {tuple(x.shape)}: resize the images to {s} px"
            )
        b = x.shape[0]
        tb = ((self.prompt_tb - self.mean) / self.std).to(x.dtype).expand(b, -1, -1, -1)
        lr = ((self.prompt_lr - self.mean) / self.std).to(x.dtype).expand(b, -1, -1, -1)
        x = torch.cat([lr[..., :p], x, lr[..., p:]], dim=-1)
        return torch.cat([tb[:, :, :p], x, tb[:, :, p:]], dim=-2)

    def forward_features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = self.pad(x)
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return backbone.forward_features(x)
        # The gradient reaches the frame through every layer of the frozen CNN, so its
        # activations are what checkpointing saves: timm's own segments, switched on for this
        # forward only (the backbone is shared with other tasks).
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise ConfigError(
                f"{type(backbone).__name__} has no set_grad_checkpointing; train vpt-pad on it "
                "without gradient checkpointing"
            )
        before = bool(getattr(backbone, "grad_checkpointing", False))
        backbone.set_grad_checkpointing(True)
        try:
            return backbone.forward_features(x)
        finally:
            backbone.set_grad_checkpointing(before)
