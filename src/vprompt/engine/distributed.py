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


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm of ``x`` (N, C, *) with its statistics taken over the batches
    of all ranks (differentiable through them); updates ``bn``'s running statistics the same
    way on every rank."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor(
        [float(x.numel() // max(x.shape[1], 1))], device=x.device, dtype=torch.float64
    )
    dist.all_reduce(count)
    n = count.item()
    xf = x.float()
    mean = differentiable_all_reduce(xf.sum(dims)) / n  # (C,)
    centred = xf - mean.view(shape)
    var = differentiable_all_reduce((centred * centred).sum(dims)) / n  # biased, as BN normalises
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        _update_running(bn, mean.detach(), var.detach(), n)
    return y.to(x.dtype)


@torch.no_grad()
def _update_running(
    bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, n: float
) -> None:
    bn.num_batches_tracked += 1
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * n / max(n - 1.0, 1.0)
    bn.running_mean.mul_(1 - m).add_(m * mean.to(bn.running_mean.dtype))
    bn.running_var.mul_(1 - m).add_(m * unbiased.to(bn.running_var.dtype))


def _distributed_training(bn: nn.Module) -> bool:
    return bn.training and dist.is_available() and dist.is_initialized()


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """`BatchNorm1d` whose training statistics are taken over the global batch of all ranks.

    torch's `SyncBatchNorm` runs on GPUs only; this one works with gloo on CPU as well and keeps
    the buffers (and so the task file) of a plain `BatchNorm1d`. With a single process, or in
    eval mode, it is exactly `BatchNorm1d`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _distributed_training(self):
            return super().forward(x)
        return _global_batch_norm(self, x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """`BatchNorm2d` with global-batch statistics (Pro-tuning's blocks, CNN backbones tuned
    with ``full`` / ``partial``): as `GlobalBatchNorm1d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _distributed_training(self):
            return super().forward(x)
        return _global_batch_norm(self, x)


def _global_batchnorm_act(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of timm's ``BatchNormAct2d`` (BN, then dropout and activation in one module,
    as in EfficientNet) with global-batch statistics."""

    class GlobalBatchNormAct2d(cls):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not _distributed_training(self):
                return super().forward(x)
            return self.act(self.drop(_global_batch_norm(self, x)))

    return GlobalBatchNormAct2d


def _global_class(m: nn.Module) -> type[nn.Module] | None:
    """The global-statistics class for ``m``'s exact class, or None to leave it as it is."""
    kind = type(m)
    if kind is nn.BatchNorm1d:
        return GlobalBatchNorm1d
    if kind is nn.BatchNorm2d:
        return GlobalBatchNorm2d
    if kind.__name__ == "BatchNormAct2d" and kind.__module__.startswith("timm."):
        return _GLOBAL_ACT.setdefault(kind, _global_batchnorm_act(kind))
    return None


_GLOBAL_ACT: dict[type[nn.Module], type[nn.Module]] = {}
_PLAIN: dict[type[nn.Module], type[nn.Module]] = {
    GlobalBatchNorm1d: nn.BatchNorm1d,
    GlobalBatchNorm2d: nn.BatchNorm2d,
}


def globalize_batchnorm(module: nn.Module) -> int:
    """Give every BatchNorm inside ``module`` (plain 1d / 2d and timm's ``BatchNormAct2d``)
    global-batch statistics in training, in place; `restore_batchnorm` undoes it.

    Returns:
        How many were converted.
    """
    count = 0
    for m in module.modules():
        cls = _global_class(m)
        if cls is not None:
            m.__class__ = cls
            count += 1
    return count


def restore_batchnorm(module: nn.Module) -> None:
    """Undo `globalize_batchnorm` (same buffers and parameters, so nothing is lost)."""
    plain = {**_PLAIN, **{g: base for base, g in _GLOBAL_ACT.items()}}
    for m in module.modules():
        if type(m) in plain:
            m.__class__ = plain[type(m)]
