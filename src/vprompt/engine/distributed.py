"""Several processes under ``torchrun``: process group, device, reductions and a global BatchNorm.

Only rank 0 writes files and prints. ``--batch-size`` is the global batch: every step each
process takes a contiguous share of the same global batch (see `vprompt.engine.sampling`), and
the loss is scaled so that DDP's gradient average equals the gradient of the global batch mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vprompt.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` fails clearly without a GPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment variables, if any.

    Uses gloo on CPU and nccl on CUDA. Without ``WORLD_SIZE`` > 1 it is a single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank if world > 1 else 0)
    if world <= 1:
        return DistInfo(device=dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(
        rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev
    )


def shutdown_distributed() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over processes (identity for one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's boolean, on every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_tensors(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Copy rank 0's values of ``tensors`` into every rank's (in place)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def gather_rows(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate each rank's rows in rank order; ranks may hold different numbers of rows."""
    if not info.enabled:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=info.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    pad = max(counts)
    padded = torch.zeros((pad, *t.shape[1:]), dtype=t.dtype, device=info.device)
    padded[: t.shape[0]] = t.to(info.device)
    parts = [torch.zeros_like(padded) for _ in range(info.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(t.device)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a global sum is the global sum of grads."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def differentiable_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, with gradients flowing back to every rank."""
    return _AllReduceSum.apply(t)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """`BatchNorm1d` whose training statistics are taken over the global batch of all ranks.

    torch's `SyncBatchNorm` runs on GPUs only; this one works with gloo on CPU as well and keeps
    the buffers (and so the task file) of a plain `BatchNorm1d`. With a single process, or in
    eval mode, it is exactly `BatchNorm1d`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        all_reduce = differentiable_all_reduce
        count = torch.tensor([float(x.shape[0])], device=x.device, dtype=torch.float64)
        dist.all_reduce(count)
        n = count.item()
        xf = x.float()
        mean = all_reduce(xf.sum(0)) / n  # (C,)
        centred = xf - mean  # (B, C)
        var = all_reduce((centred * centred).sum(0)) / n  # (C,) biased, as BatchNorm normalises
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * n / max(n - 1.0, 1.0)
        self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))


def globalize_batchnorm(module: nn.Module) -> int:
    """Turn every plain `BatchNorm1d` inside ``module`` into a `GlobalBatchNorm1d` (in place).

    Returns:
        How many were converted.
    """
    count = 0
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = GlobalBatchNorm1d
            count += 1
    return count
