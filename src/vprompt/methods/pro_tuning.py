"""Pro-tuning (Nie et al., IEEE TCSVT 2023): stage-wise prompt blocks on a frozen backbone.

There is no public code for the paper; this is vprompt's reading of it (see
``docs/methods/pro-tuning.md``). After each chosen stage a lightweight prompt block turns the
stage's output feature map into an input-specific prompt that is added back to the features
before they go on to the next stage::

    z = stage_output                                  # (B, C, H, W)
    p = expand(gelu(dw_kxk(gelu(norm(reduce(z))))))   # (B, C, H, W), expand zero-initialised
    stage_output <- z + p

CNN stages come from timm's ``feature_info``; for ViTs the blocks are split into ``vit_groups``
groups and the patch tokens entering (or leaving) each group are viewed as a (B, D, h, w) map.
The blocks are applied by forward hooks that exist only while `ProTuning.forward_features` runs,
so the frozen backbone stays shareable by other tasks.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from vprompt.errors import ConfigError
from vprompt.methods.base import (
    Method,
    MethodConfig,
    check_at_least,
    check_choice,
    is_vit,
    resolve_pool,
)
from vprompt.methods.baselines import feature_stages
from vprompt.methods.registry import register_method

__all__ = ["ProTuning", "ProTuningConfig", "PromptBlock", "PromptSite", "prompt_sites"]

FuseType = Literal["add"]
"""How a prompt joins the features: ``add`` = ``features + prompt``."""

PromptNorm = Literal["bn", "gn", "none"]
"""Norm after the 1x1 reduce: ``bn`` BatchNorm2d, ``gn`` GroupNorm with one group (a LayerNorm
over channels and space, independent of the batch), ``none``."""

Layout = Literal["NCHW", "NHWC", "NLC"]
"""Layout of a site's tensor: CNN maps (channels first or last) or ViT tokens (B, T, D)."""

VitPosition = Literal["before", "after"]
"""Where a ViT group's prompt goes: ``before`` = on the tokens entering the group (computed from
them), ``after`` = on the tokens leaving it. Both put a block between consecutive groups; they
differ at the ends: ``before`` prompts the patch embeddings entering block 0, ``after`` prompts the
last block's output, which a class-token head never sees."""

MIN_DEFAULT_STRIDE = 4
"""Default CNN stages are the ``feature_info`` entries at stride >= 4 (stride-2 entries are stems)."""


@dataclass
class ProTuningConfig(MethodConfig):
    """Pro-tuning options.

    Attributes:
        stages: indices of the sites that get a prompt block: ``feature_info`` entries for CNNs,
            block groups for ViTs. None: every ViT group; every CNN stage at stride >= 4.
        reduction: bottleneck width = channels // reduction (at least ``min_hidden``).
        min_hidden: smallest bottleneck width (capped at the stage's channels).
        kernel_size: odd size of the depthwise convolution.
        norm: norm after the 1x1 reduce (see `PromptNorm`).
        vit_groups: ViTs only: split the blocks into this many groups, one prompt block each.
        vit_position: ViTs only: prompt the tokens entering or leaving each group (see
            `VitPosition`).
        fuse: how the prompt joins the features (see `FuseType`).
    """

    name: ClassVar[str] = "pro-tuning"
    stages: tuple[int, ...] | None = None
    reduction: int = 4
    min_hidden: int = 8
    kernel_size: int = 3
    norm: PromptNorm = "bn"
    vit_groups: int = 4
    vit_position: VitPosition = "before"
    fuse: FuseType = "add"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "norm", PromptNorm)
        check_choice(self, "fuse", FuseType)
        check_choice(self, "vit_position", VitPosition)
        for field in ("reduction", "min_hidden", "kernel_size", "vit_groups"):
            check_at_least(self, field, 1)
        if self.kernel_size % 2 == 0:
            raise ConfigError(
                f"{self.name}: kernel_size must be odd (same-size padding), got {self.kernel_size}"
            )
        if self.stages is not None:
            self.stages = _normalise_stages(self.name, self.stages)


def _normalise_stages(name: str, stages: Any) -> tuple[int, ...]:
    """Stage indices as a sorted tuple (a JSON list is accepted); rejects empty/negative/repeats."""
    if isinstance(stages, int):
        stages = (stages,)
    try:
        values = tuple(stages)
    except TypeError:
        raise ConfigError(
            f"{name}: stages must be a list of stage indices, got {stages!r}"
        ) from None
    if not values:
        raise ConfigError(f"{name}: stages is empty; give stage indices or None for the default")
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ConfigError(f"{name}: stages must be non-negative integers, got {list(values)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: stages has repeats: {list(values)}")
    return tuple(sorted(values))


# ---------------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class PromptSite:
    """A place a prompt block can go: the output (or input) of one backbone module.

    Attributes:
        index: the stage index users pass in ``stages``.
        module: dotted name of the module whose output (or first input) gets the prompt.
        channels: channels (CNN) or width (ViT) of that tensor.
        reduction: its stride relative to the input image.
        layout: how it is laid out (see `Layout`).
        label: human-readable description for messages.
        on_input: prompt the module's first positional input instead of its output.
    """

    index: int
    module: str
    channels: int
    reduction: int
    layout: Layout
    label: str
    on_input: bool = False


def _vit_sites(backbone: nn.Module, groups: int, position: VitPosition) -> list[PromptSite]:
    """One site per group of consecutive ViT blocks: its first block's input or last's output."""
    depth = len(backbone.blocks)
    if groups > depth:
        raise ConfigError(
            f"pro-tuning: vit_groups={groups} but the ViT has only {depth} blocks; "
            f"use vit_groups <= {depth}"
        )
    width = int(getattr(backbone, "embed_dim", backbone.num_features))
    stride = int(max(backbone.patch_embed.patch_size))
    ends = [(g + 1) * depth // groups - 1 for g in range(groups)]  # last block of each group
    starts = [0] + [e + 1 for e in ends[:-1]]
    before = position == "before"
    return [
        PromptSite(
            g,
            f"blocks.{start if before else end}",
            width,
            stride,
            "NLC",
            f"{g}: {position} blocks {start}-{end} ({width} ch)",
            on_input=before,
        )
        for g, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]


def _map_layout(backbone: nn.Module) -> Layout:
    """Channels-first or channels-last stage maps, from timm's ``output_fmt`` (default NCHW)."""
    fmt = str(getattr(backbone, "output_fmt", "NCHW"))
    if fmt not in ("NCHW", "NHWC"):
        raise ConfigError(
            f"pro-tuning: {type(backbone).__name__} gives {fmt!r} features; prompt blocks need "
            "NCHW or NHWC stage maps"
        )
    return fmt  # type: ignore[return-value]


def _cnn_sites(backbone: nn.Module) -> list[PromptSite]:
    """One site per ``feature_info`` stage."""
    layout = _map_layout(backbone)
    return [
        PromptSite(s.index, s.module, s.channels, s.reduction, layout, s.describe())
        for s in feature_stages(backbone)
    ]


def is_token_model(backbone: nn.Module) -> bool:
    """ViTs and their relatives (EVA, BEiT, ...): ``blocks`` over (B, prefix + N, D) tokens
    from a ``patch_embed``; Pro-tuning groups their blocks as it groups a ViT's."""
    return is_vit(backbone) or all(
        hasattr(backbone, a) for a in ("blocks", "patch_embed", "num_prefix_tokens")
    )


def prompt_sites(
    backbone: nn.Module, vit_groups: int = 4, vit_position: VitPosition = "before"
) -> list[PromptSite]:
    """Every place a prompt block could go in ``backbone`` (ViT groups or CNN stages)."""
    if is_token_model(backbone):
        return _vit_sites(backbone, vit_groups, vit_position)
    return _cnn_sites(backbone)


def _default_sites(sites: list[PromptSite]) -> list[PromptSite]:
    """Every site at stride >= 4 (ViT groups all are); all sites if none is."""
    chosen = [s for s in sites if s.layout == "NLC" or s.reduction >= MIN_DEFAULT_STRIDE]
    return chosen or sites


def choose_sites(config: ProTuningConfig, backbone: nn.Module) -> list[PromptSite]:
    """The sites ``config.stages`` selects, or the defaults; rejects out-of-range indices."""
    sites = prompt_sites(backbone, config.vit_groups, config.vit_position)
    if config.stages is None:
        chosen = _default_sites(sites)
    else:
        bad = [s for s in config.stages if s >= len(sites)]
        if bad:
            listing = "; ".join(s.label for s in sites)
            raise ConfigError(
                f"pro-tuning: stages {bad} out of range; {type(backbone).__name__} has "
                f"{len(sites)} stages: {listing}"
            )
        chosen = [sites[i] for i in config.stages]
    _check_reaches_head(config, backbone, chosen)
    return chosen


def _check_reaches_head(
    config: ProTuningConfig, backbone: nn.Module, sites: list[PromptSite]
) -> None:
    """Reject a prompt on the last ViT block's patch tokens when the head reads the class token."""
    if not is_token_model(backbone) or config.vit_position != "after":
        return
    last = f"blocks.{len(backbone.blocks) - 1}"
    reads_cls = (
        resolve_pool(config.pool, backbone) == "cls"
        if is_vit(backbone)
        else getattr(backbone, "global_pool", "") == "token"  # pooled by its own head
    )
    if any(s.module == last for s in sites) and reads_cls:
        pooling = (
            "a patch pooling (pool='cls+patch-mean')"
            if is_vit(backbone)
            else "the model with global_pool='avg'"
        )
        raise ConfigError(
            "pro-tuning: with vit_position='after' the last group's prompt is added to the patch "
            "tokens after the last block, which a class-token head (pool='cls') never reads; use "
            f"vit_position='before', {pooling}, or leave the last group out of stages"
        )


# ---------------------------------------------------------------------------------- block
def hidden_width(channels: int, reduction: int, min_hidden: int) -> int:
    """Bottleneck width: ``max(channels // reduction, min(min_hidden, channels))``."""
    return max(channels // reduction, min(min_hidden, channels))


def _norm(kind: PromptNorm, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class PromptBlock(nn.Module):
    """1x1 reduce -> norm -> GELU -> depthwise kxk -> GELU -> 1x1 expand (zero-initialised)."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, norm: PromptNorm) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=norm == "none")
        self.norm = _norm(norm, hidden)
        self.act1 = nn.GELU()
        self.dw = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.act2 = nn.GELU()
        self.expand = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt for a (B, C, H, W) map, same shape."""
        x = self.act1(self.norm(self.reduce(x)))  # (B, hidden, H, W)
        x = self.act2(self.dw(x))  # (B, hidden, H, W)
        return self.expand(x)  # (B, C, H, W)


def prompt_block_parameters(
    channels: int, reduction: int, kernel_size: int, norm: PromptNorm, min_hidden: int = 8
) -> int:
    """Trainable parameters of one `PromptBlock` (the formula in the docs)."""
    h = hidden_width(channels, reduction, min_hidden)
    reduce = channels * h + (h if norm == "none" else 0)
    norm_params = 0 if norm == "none" else 2 * h
    dw = h * kernel_size * kernel_size + h
    expand = h * channels + channels
    return reduce + norm_params + dw + expand


# ---------------------------------------------------------------------------------- fusing
def _fuse_map(block: PromptBlock, layout: Layout, channels: int, z: torch.Tensor) -> torch.Tensor:
    """Add the prompt to a stage's feature map, NCHW or NHWC."""
    channel_dim = 1 if layout == "NCHW" else -1
    if z.ndim != 4 or z.shape[channel_dim] != channels:
        raise ConfigError(
            f"pro-tuning: expected a {layout} map with {channels} channels from the stage, got "
            f"shape {tuple(z.shape)}"
        )
    if layout == "NCHW":
        return z + block(z)  # (B, C, H, W)
    prompt = block(z.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
    return z + prompt.permute(0, 2, 3, 1)  # (B, H, W, C)


def _fuse_tokens(
    block: PromptBlock, prefix: int, grid: tuple[int, int], tokens: torch.Tensor
) -> torch.Tensor:
    """Add the prompt to the patch tokens of (B, prefix + N, D) ViT tokens; prefix unchanged."""
    if tokens.ndim != 3:
        raise ConfigError(f"pro-tuning: expected ViT tokens (B, T, D), got {tuple(tokens.shape)}")
    h, w = grid
    head, patches = tokens[:, :prefix], tokens[:, prefix:]  # (B, prefix, D), (B, N, D)
    b, n, d = patches.shape
    if n != h * w:
        raise ConfigError(
            f"pro-tuning: {n} patch tokens after {prefix} prefix tokens do not fill the "
            f"{h}x{w} patch grid"
        )
    fmap = patches.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
    prompt = block(fmap).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
    return torch.cat([head, patches + prompt], dim=1)  # (B, prefix + N, D)


def patch_grid(backbone: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """The ViT patch grid (h, w) for input images ``x``, dynamic image size and padding included."""
    embed = backbone.patch_embed
    feat_size = getattr(embed, "dynamic_feat_size", None)
    if callable(feat_size):
        h, w = feat_size((int(x.shape[-2]), int(x.shape[-1])))
    else:
        h, w = embed.grid_size
    return int(h), int(w)


# ---------------------------------------------------------------------------------- method
@register_method
class ProTuning(Method):
    """Stage-wise prompt blocks whose outputs are added to the frozen backbone's features."""

    config_class: ClassVar[type[MethodConfig]] = ProTuningConfig

    def __init__(self, config: ProTuningConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        self.sites: list[PromptSite] = choose_sites(config, backbone)  # names, not modules
        self.blocks = nn.ModuleList(
            PromptBlock(
                s.channels,
                hidden_width(s.channels, config.reduction, config.min_hidden),
                config.kernel_size,
                config.norm,
            )
            for s in self.sites
        )

    @property
    def site_modules(self) -> list[str]:
        return [s.module for s in self.sites]

    @property
    def site_channels(self) -> list[int]:
        return [s.channels for s in self.sites]

    @property
    def site_layouts(self) -> list[Layout]:
        return [s.layout for s in self.sites]

    def forward_features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and getattr(backbone, "grad_checkpointing", False):
            raise ConfigError(
                "pro-tuning: the backbone has gradient checkpointing on; its recomputation would "
                "run without the prompt hooks. Turn it off (set_grad_checkpointing(False))"
            )
        with self.prompts_active(backbone, x):
            return backbone.forward_features(x)

    @contextmanager
    def prompts_active(self, backbone: nn.Module, x: torch.Tensor) -> Iterator[None]:
        """Register the prompt hooks on ``backbone`` for one forward of ``x``; remove them after.

        Hooks act only in the thread that registered them, so another thread running the same
        shared backbone meanwhile sees the plain frozen model.
        """
        owner = threading.get_ident()
        grid = patch_grid(backbone, x) if "NLC" in self.site_layouts else (0, 0)
        prefix = int(getattr(backbone, "num_prefix_tokens", 0))
        handles = []
        try:
            for i, site in enumerate(self.sites):
                module = backbone.get_submodule(site.module)
                if site.on_input:
                    hook = functools.partial(self._input_hook, i, owner, prefix, grid)
                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    hook = functools.partial(self._output_hook, i, owner, prefix, grid)
                    handles.append(module.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _output_hook(
        self,
        i: int,
        owner: int,
        prefix: int,
        grid: tuple[int, int],
        module: nn.Module,
        args: tuple[Any, ...],
        output: Any,
    ) -> torch.Tensor | None:
        if threading.get_ident() != owner:
            return None
        return self._fuse(i, prefix, grid, output)

    def _input_hook(
        self,
        i: int,
        owner: int,
        prefix: int,
        grid: tuple[int, int],
        module: nn.Module,
        args: tuple[Any, ...],
    ) -> tuple[Any, ...] | None:
        if threading.get_ident() != owner:
            return None
        if not args:
            raise ConfigError(f"pro-tuning: {self.sites[i].module} was called without inputs")
        return (self._fuse(i, prefix, grid, args[0]), *args[1:])

    def _fuse(self, i: int, prefix: int, grid: tuple[int, int], z: Any) -> torch.Tensor:
        """``z`` + the prompt block ``i`` computes from it."""
        site = self.sites[i]
        if not isinstance(z, torch.Tensor):
            raise ConfigError(
                f"pro-tuning: {site.module} gives {type(z).__name__}, not a tensor; cannot add "
                "a prompt to it"
            )
        if site.layout == "NLC":
            return _fuse_tokens(self.blocks[i], prefix, grid, z)
        return _fuse_map(self.blocks[i], site.layout, site.channels, z)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ConfigError(
                "pro-tuning does not support gradient checkpointing: the backbone's recomputation "
                "in backward would run without the prompt hooks"
            )
        super().set_grad_checkpointing(False)
