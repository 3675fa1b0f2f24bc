"""The published baselines as methods: linear probe, full fine-tune, BitFit and partial-k.

What trains is decided from module structure, never from substrings of parameter names:

* ``linear``: the head only.
* ``full``: every backbone parameter (except the backbone's own classifier and a ViT's attention
  pool, which vprompt's head replaces), with dropout, drop-path and batch-norm statistics in
  training behaviour.
* ``bitfit``: every bias term: the ``bias`` of each module that has one (Linear, Conv, norms...)
  and the split attention biases of EVA / BEiT (``q_bias``, ``v_bias``).
* ``partial``: the last k blocks (ViTs) or stages (CNNs, found through timm's ``feature_info``)
  and everything registered after them: the final norm(s) and, for CNNs, the layers that follow
  the last stage (EfficientNet ``conv_head``/``bn2``, ConvNeXt ``norm_pre``/``head.norm``).

Methods that tune backbone weights get a deep copy of the backbone from `PromptedModel`, so they
keep module *names*, never modules, and resolve them on the backbone they are handed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from vprompt.errors import ConfigError
from vprompt.methods.base import Method, MethodConfig, is_vit, unused_parameter_ids
from vprompt.methods.registry import register_method

__all__ = [
    "BitFit",
    "BitFitConfig",
    "FullConfig",
    "FullFineTune",
    "LinearConfig",
    "LinearProbe",
    "PartialConfig",
    "PartialFineTune",
    "StageInfo",
    "feature_stages",
]


# ---------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class StageInfo:
    """One entry of a timm model's ``feature_info``.

    Attributes:
        index: position in ``feature_info`` (timm's ``out_indices`` numbering).
        module: dotted name of the module whose output is the stage's feature map.
        channels: channels of that feature map.
        reduction: its stride relative to the input image.
    """

    index: int
    module: str
    channels: int
    reduction: int

    def describe(self) -> str:
        return f"{self.index}: {self.module} ({self.channels} ch, stride {self.reduction})"


def feature_stages(backbone: nn.Module) -> list[StageInfo]:
    """The stages timm lists in ``backbone.feature_info``, each resolved to a real submodule.

    Raises:
        ConfigError: the backbone has no ``feature_info``, or an entry names no submodule.
    """
    info: Any = getattr(backbone, "feature_info", None)
    if info is not None and not isinstance(info, (list, tuple)):
        info = getattr(info, "info", None)  # a timm `FeatureInfo`: every entry, not only outputs
    if not info:
        raise ConfigError(
            f"{type(backbone).__name__} has no timm `feature_info`, so its stages cannot be found; "
            "use a timm model (created with timm.create_model) or a ViT"
        )
    stages = []
    for i, entry in enumerate(info):
        name = str(entry["module"])
        try:
            backbone.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"feature_info entry {i} names module {name!r}, which "
                f"{type(backbone).__name__} does not have"
            ) from None
        stages.append(StageInfo(i, name, int(entry["num_chs"]), int(entry["reduction"])))
    return stages


def _direct_parameters(
    backbone: nn.Module, module_names: list[str]
) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters registered directly on the named modules (no recursion), unused ones
    (`unused_parameter_ids`) excluded."""
    skip = unused_parameter_ids(backbone)
    seen: set[int] = set()
    for module_name in module_names:
        module = backbone.get_submodule(module_name)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in skip or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{module_name}.{pname}" if module_name else pname), p


def modules_after(backbone: nn.Module, start: str | None, inclusive: bool) -> list[str]:
    """Names of the modules registered at or after ``start`` (``named_modules`` order).

    Registration order is timm's execution order for the models vprompt supports: stem, stages,
    final layers, head. With ``inclusive=False`` the modules inside ``start`` are skipped as
    well; ``start=None`` returns every module, the root included.
    """
    names = [name for name, _ in backbone.named_modules()]
    if start is None:
        return names
    first = names.index(start)
    if inclusive:
        return names[first:]
    inside = start + "."
    return [n for n in names[first + 1 :] if not n.startswith(inside)]


# ---------------------------------------------------------------------------------- linear
@dataclass
class LinearConfig(MethodConfig):
    """Linear probe: only the head trains (options: those of every method)."""

    name: ClassVar[str] = "linear"


@register_method
class LinearProbe(Method):
    """Head only; the backbone is frozen and runs at inference behaviour."""

    config_class: ClassVar[type[MethodConfig]] = LinearConfig


# ---------------------------------------------------------------------------------- full
@dataclass
class FullConfig(MethodConfig):
    """Full fine-tune: every backbone weight trains (options: those of every method)."""

    name: ClassVar[str] = "full"


@register_method
class FullFineTune(Method):
    """Every backbone weight trains, with dropout, drop-path and BN statistics in train mode."""

    config_class: ClassVar[type[MethodConfig]] = FullConfig
    trains_backbone: ClassVar[bool] = True
    backbone_train_mode: ClassVar[bool] = True

    def backbone_parameters(self, backbone: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        skip = unused_parameter_ids(backbone)
        return ((n, p) for n, p in backbone.named_parameters() if id(p) not in skip)


# ---------------------------------------------------------------------------------- bitfit
@dataclass
class BitFitConfig(MethodConfig):
    """BitFit: bias terms only (options: those of every method)."""

    name: ClassVar[str] = "bitfit"


def bias_parameters(backbone: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every bias term: parameters named ``bias`` (Linear, Conv, norms...) or ``*_bias`` (EVA /
    BEiT attention's ``q_bias`` and ``v_bias``, kept apart from a bias-free key projection).
    Tables such as ``relative_position_bias_table`` are position encodings, not biases."""
    for name, param in backbone.named_parameters():
        last = name.rsplit(".", 1)[-1]
        if last == "bias" or last.endswith("_bias"):
            yield name, param


@register_method
class BitFit(Method):
    """Trains every bias term of the backbone (`bias_parameters`); the backbone stays in eval."""

    config_class: ClassVar[type[MethodConfig]] = BitFitConfig
    trains_backbone: ClassVar[bool] = True

    def backbone_parameters(self, backbone: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        skip = unused_parameter_ids(backbone)
        for name, bias in bias_parameters(backbone):  # named_parameters: each tensor once
            if id(bias) not in skip:
                yield name, bias


# ---------------------------------------------------------------------------------- partial
@dataclass
class PartialConfig(MethodConfig):
    """Partial-k fine-tune.

    Attributes:
        k: how many of the last blocks (ViT) or stages (CNN) train.
    """

    name: ClassVar[str] = "partial"
    k: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:  # an integer: check_field_types
            raise ConfigError(
                f"{self.name}: k must be an integer >= 1 (blocks to train), got {self.k!r}"
            )


def partial_units(backbone: nn.Module) -> tuple[list[str], str]:
    """The module names partial-k counts from the end, and what they are called.

    ViTs: ``blocks.0`` ... ``blocks.{depth-1}``. CNNs: every ``feature_info`` stage.
    """
    if is_vit(backbone):
        return [f"blocks.{i}" for i in range(len(backbone.blocks))], "blocks"
    return [s.module for s in feature_stages(backbone)], "stages"


def partial_modules(backbone: nn.Module, k: int) -> list[str]:
    """Names of the modules partial-k trains (their own parameters, no recursion needed).

    The tail starts right after unit ``-(k+1)`` ends. With k equal to the number of units, a ViT
    starts at ``blocks.0`` (patch and position embeddings stay frozen) and a CNN trains
    everything, its stem being part of stage 0.
    """
    units, kind = partial_units(backbone)
    if k > len(units):
        listing = ", ".join(f"{i}: {u}" for i, u in enumerate(units))
        raise ConfigError(
            f"partial: k={k} but {type(backbone).__name__} has {len(units)} {kind} ({listing}); "
            f"use 1 <= k <= {len(units)}"
        )
    if k < len(units):
        return modules_after(backbone, units[-(k + 1)], inclusive=False)
    if kind == "blocks":
        return modules_after(backbone, units[0], inclusive=True)
    return modules_after(backbone, None, inclusive=True)


@register_method
class PartialFineTune(Method):
    """The last k blocks/stages, what follows them (final norms, CNN final conv) and the head."""

    config_class: ClassVar[type[MethodConfig]] = PartialConfig
    trains_backbone: ClassVar[bool] = True

    def __init__(self, config: PartialConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        self.tuned_modules: list[str] = partial_modules(backbone, config.k)
        if not any(True for _ in _direct_parameters(backbone, self.tuned_modules)):
            raise ConfigError(f"partial: the last k={config.k} stage(s) have no parameters")

    def backbone_parameters(self, backbone: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return _direct_parameters(backbone, self.tuned_modules)
