"""Linear probing on cached features: one frozen forward per image, then the head trains alone.

When nothing in front of the head trains, the backbone is deterministic (no augmentation, no
train-mode layers), the head's input is a fixed vector per image. It is computed once, kept in
memory as one tensor, and the head (BatchNorm + linear) trains on it in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset, TensorDataset

from vprompt.engine.distributed import DistInfo
from vprompt.engine.evaluate import autocast
from vprompt.engine.sampling import shard_range
from vprompt.errors import ConfigError
from vprompt.methods.base import PromptedModel


def head_only(model: PromptedModel) -> bool:
    """True when the head holds every trainable parameter and the backbone runs as at inference."""
    if model.method.backbone_train_mode:
        return False
    return all(n.startswith("head.") for n, _ in model.named_trainable_parameters())


def use_feature_cache(model: PromptedModel, mode: str, augment: str) -> bool:
    """Decide the ``feature_cache`` option (``auto``, ``on``, ``off``)."""
    possible = head_only(model) and augment == "none"
    if mode == "on" and not possible:
        why = "augmentation is on" if augment != "none" else "parameters before the head train"
        raise ConfigError(
            f"feature_cache=on is impossible here: {why}; use --feature-cache auto or off"
        )
    return possible and mode != "off"


@torch.no_grad()
def head_inputs(
    model: PromptedModel,
    dataset: Dataset,
    *,
    batch_size: int,
    info: DistInfo,
    precision: str = "fp32",
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> TensorDataset:
    """Features exactly as they enter ``model.head``, for every image of ``dataset``.

    The input of the head is captured by a forward pre-hook, so whatever the model does before
    the head (pooling, ``fc_norm``) is reproduced exactly. Under torchrun each process computes a
    shard and the shards are gathered, so every process holds the whole tensor.

    Returns:
        ``(features (N, F) float32, labels (N,))`` as a dataset.
    """
    from torch.utils.data import DataLoader, Subset

    from vprompt.engine.distributed import gather_rows

    captured: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].float()))
    model.eval()
    shard = Subset(dataset, list(shard_range(len(dataset), info.rank, info.world)))  # type: ignore[arg-type]
    labels: list[torch.Tensor] = []
    try:
        loader = DataLoader(  # own generator: caching leaves the global RNG as it was
            shard,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            generator=torch.Generator(),
        )
        for x, y in loader:
            with autocast(info.device, precision):
                model(x.to(info.device))
            labels.append(torch.as_tensor(y))
            if progress is not None:
                progress(len(y))
    finally:
        hook.remove()
    dim = model.head.in_features
    feats = torch.cat(captured).cpu() if captured else torch.zeros((0, dim))
    labs = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    return TensorDataset(gather_rows(feats, info), gather_rows(labs, info))
