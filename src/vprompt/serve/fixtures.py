"""Tasks with random parameters, for tests, benchmarks and demos of serving.

A freshly attached task is a poor test subject: VPT prompts start small, the Pro-tuning expand
layer and every head bias start at zero, so different tasks give nearly the same logits. These
helpers draw every trainable tensor (prompts, prompt blocks, tuned backbone weights, head) at
random, so a mixed batch that used the wrong task for a row would show.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vprompt.backbones.base import Backbone
from vprompt.methods.base import PromptedModel
from vprompt.methods.registry import attach

__all__ = ["random_task", "save_random_task"]


@torch.no_grad()
def random_task(
    backbone: Backbone,
    method: str,
    num_classes: int = 3,
    seed: int = 0,
    scale: float = 0.5,
    **options: Any,
) -> PromptedModel:
    """Attach ``method`` and fill every trainable tensor with N(0, scale^2) noise.

    Tuned backbone weights (full, bitfit, partial) get the noise added to their value instead,
    so the model stays close to the backbone. Class names are ``c0``, ``c1``...
    """
    model = attach(
        backbone,
        method,
        num_classes=num_classes,
        class_names=[f"c{i}" for i in range(num_classes)],
        **options,
    )
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_trainable_parameters():
        noise = torch.randn(p.shape, generator=gen) * scale  # same shape as the tensor
        if name.startswith("backbone."):
            p.add_(noise * 0.1)
        else:
            p.copy_(noise)
    return model.eval()


def save_random_task(
    directory: str | os.PathLike,
    backbone: Backbone,
    method: str,
    num_classes: int = 3,
    seed: int = 0,
    **options: Any,
) -> Path:
    """`random_task`, saved as a task artifact in ``directory``."""
    model = random_task(backbone, method, num_classes=num_classes, seed=seed, **options)
    return model.save_task(str(directory), note="random parameters (vprompt.serve.fixtures)")
