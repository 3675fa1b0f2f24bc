"""Evaluation: top-1, top-5, loss, per-class accuracy and the confusion matrix.

Under torchrun every process evaluates a contiguous shard of the split and the per-image results
are gathered in index order, so each image counts exactly once whatever the shard sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from vprompt.engine.distributed import DistInfo, gather_rows
from vprompt.engine.sampling import shard_range

TOP_K = 5


@dataclass
class Predictions:
    """Per-image results of one split, in dataset order.

    Attributes:
        labels: (N,) true classes.
        topk: (N, k) predicted classes, best first.
        loss: (N,) cross-entropy of each image.
    """

    labels: torch.Tensor
    topk: torch.Tensor
    loss: torch.Tensor


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision='bf16'``, else a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_split(
    forward: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    info: DistInfo,
    precision: str = "fp32",
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Predictions:
    """Run ``forward`` (in eval mode) over a split, sharded across processes and gathered.

    Args:
        forward: images (or cached features) -> logits.
        dataset: yields ``(input, label)``.
        batch_size: images per forward.
        info: the process layout.
        precision: ``fp32`` or ``bf16``.
        workers: DataLoader workers.
        progress: called with the number of images after each batch.
    """
    shard = Subset(dataset, list(shard_range(len(dataset), info.rank, info.world)))  # type: ignore[arg-type]
    # its own generator: creating the iterator would otherwise draw from the global RNG, and
    # evaluating (or not) would shift the training's dropout masks and data order after it
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        generator=torch.Generator(),
    )
    labels, topk, losses = [], [], []
    for x, y in loader:
        x, y = x.to(info.device), torch.as_tensor(y).to(info.device)
        with autocast(info.device, precision):
            logits = forward(x)
        logits = logits.float()
        k = min(TOP_K, logits.shape[-1])
        topk.append(logits.topk(k, dim=-1).indices.cpu())
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
        labels.append(y.cpu())
        if progress is not None:
            progress(len(y))
    k = min(TOP_K, _num_outputs(forward, topk))
    result = Predictions(
        labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
        topk=torch.cat(topk) if topk else torch.zeros((0, k), dtype=torch.int64),
        loss=torch.cat(losses) if losses else torch.zeros(0),
    )
    return Predictions(
        labels=gather_rows(result.labels, info),
        topk=gather_rows(result.topk, info),
        loss=gather_rows(result.loss, info),
    )


def _num_outputs(forward: Any, topk: list[torch.Tensor]) -> int:
    if topk:
        return topk[0].shape[1]
    head = getattr(forward, "num_classes", None)
    return int(head) if head else TOP_K


def summarize(pred: Predictions, class_names: list[str]) -> dict[str, Any]:
    """Top-1, top-5, mean loss, per-class accuracy and the confusion matrix (rows: true class)."""
    n = int(pred.labels.numel())
    c = len(class_names)
    if n == 0:
        return {"n": 0, "top1": None, "top5": None, "loss": None, "per_class": {}, "confusion": []}
    top1 = pred.topk[:, 0]
    hit1 = top1 == pred.labels
    hit5 = (pred.topk == pred.labels[:, None]).any(dim=1)
    confusion = torch.zeros((c, c), dtype=torch.int64)
    confusion.index_put_((pred.labels, top1), torch.ones_like(top1), accumulate=True)
    per_class = {}
    for i, name in enumerate(class_names):
        total = int(confusion[i].sum())
        per_class[name] = float(confusion[i, i]) / total if total else None
    return {
        "n": n,
        "top1": float(hit1.float().mean()),
        "top5": float(hit5.float().mean()),
        "loss": float(pred.loss.mean()),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def save_confusion_png(
    confusion: list[list[int]], class_names: list[str], path: Path, title: str = ""
) -> Path:
    """Draw the confusion matrix (row-normalised colours, counts written in cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(confusion, dtype=torch.float64)
    rows = m.sum(dim=1, keepdim=True).clamp(min=1)
    c = len(class_names)
    size = min(4 + 0.45 * c, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow((m / rows).numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), class_names, rotation=90 if c > 6 else 0)
    ax.set_yticks(range(c), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                v = int(m[i, j])
                if v:
                    dark = m[i, j] / rows[i, 0] > 0.5
                    ax.text(
                        j,
                        i,
                        str(v),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
