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
224 px).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
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
        img_size: side of the images the frame surrounds. None: the backbone's input size, filled
            in by `attach` and stored with the task.
    """

    name: ClassVar[str] = "vpt-pad"
    prompt_len: int = 5
    init: PadInit = "uniform"
    img_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, "prompt_len", 1)
        check_choice(self, "init", PadInit)
        if self.img_size is not None:
            check_at_least(self, "img_size", 1)


@register_method
class VPTPad(Method):
    """Learnable pixels around the image, then the frozen backbone (see the module docstring)."""

    config_class = VPTPadConfig
    config: VPTPadConfig

    def __init__(
        self,
        config: VPTPadConfig,
        backbone: nn.Module,
        mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        std: tuple[float, ...] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__(config, backbone)
        if is_vit(backbone) or hasattr(backbone, "patch_embed"):
            raise ConfigError(
                f"vpt-pad is VPT's ConvNet variant: it makes the input 2 x prompt_len pixels "
                f"larger, which {type(backbone).__name__} (built for one input size) does not "
                "take; for transformers use 'vpt-shallow' or 'vpt-deep'"
            )
        if config.img_size is None:
            raise ConfigError(
                "vpt-pad needs img_size (the side of the images it frames); attach() fills it in "
                "from the backbone"
            )
        p, s = config.prompt_len, config.img_size
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
        size = backbone.img_size
        if config.img_size is None:
            config = replace(config, img_size=size)
        elif config.img_size != size:
            raise ConfigError(
                f"vpt-pad was set up for {config.img_size} px images but the backbone takes "
                f"{size} px; load the backbone with img_size={config.img_size} (or leave img_size "
                "out of the method options)"
            )
        cfg = backbone.data_config
        if len(cfg.mean) != 3 or len(cfg.std) != 3:
            raise ConfigError(
                f"vpt-pad frames 3-channel images; the backbone's preprocessing has "
                f"{len(cfg.mean)} mean values"
            )
        return cls(config, backbone.model, mean=tuple(cfg.mean), std=tuple(cfg.std))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, s, s) -> framed images (B, 3, s + 2p, s + 2p)."""
        s, p = self.config.img_size, self.config.prompt_len
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
        return backbone.forward_features(self.pad(x))
