"""Optimizer with no-decay groups, and the per-step warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vprompt.engine.config import TrainConfig


def param_groups(
    named: list[tuple[str, nn.Parameter]],
    no_decay: set[str],
    wd: float,
    head_wd: float | None = None,
) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and a no-decay group (1-D tensors, ``no_decay``);
    with ``head_wd``, the head's decayed weights (names ``head.*``) form a third group."""
    decay, head, skip = [], [], []
    for name, p in named:
        if name in no_decay or p.ndim <= 1:
            skip.append(p)
        elif head_wd is not None and name.startswith("head."):
            head.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": wd, "group": "decay"})
    if head:
        groups.append({"params": head, "weight_decay": head_wd, "group": "head_decay"})
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0, "group": "no_decay"})
    return groups


def build_optimizer(
    named: list[tuple[str, nn.Parameter]], no_decay: set[str], cfg: TrainConfig
) -> torch.optim.Optimizer:
    """SGD with momentum (VPT) or AdamW (SPT) at the resolved peak learning rate."""
    head_wd = None if cfg.head_wd is None else float(cfg.head_wd)
    groups = param_groups(named, no_decay, float(cfg.wd or 0.0), head_wd)
    lr = cfg.actual_lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


@dataclass
class WarmupCosine:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine down to ``min_lr``.

    The state is a single step counter, so it saves as a plain dict.
    """

    optimizer: torch.optim.Optimizer
    peak: float
    total_steps: int
    warmup_steps: int
    min_lr: float = 1e-8
    step_count: int = 0

    def lr_at(self, step: int) -> float:
        """Learning rate used for optimizer step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def apply(self) -> float:
        """Set the learning rate for the next optimizer step and return it."""
        lr = self.lr_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def step(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step"])
