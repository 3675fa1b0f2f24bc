"""SPT: Self-Prompt Tuning (Wang et al., ICML 2024) on timm ViTs, shallow and deep.

SPT is VPT with a data-dependent start: block i's prompts begin as "prototypes" of the patch
tokens that enter block i of the frozen, prompt-free backbone on downstream training images.
Insertion and forward are VPT's (`SPTShallow` / `SPTDeep` subclass the VPT modules, so the fast
deep path is unchanged); only `prepare` is new.

The prototypes come from one frozen forward pass whose block inputs are captured by forward
pre-hooks and folded into bounded per-layer accumulators as the batches stream by:

* ``random-tokens``: a bottom-k reservoir of P tokens (uniform sample without replacement).
* ``mean-pool`` / ``max-pool``: P raster-order windows per image (adaptive 1-d pooling over the
  token axis), pooled per window, averaged over images (exact running sum).
* ``kmeans``: a bottom-k reservoir of at most ``token_budget`` tokens, then k-means (greedy
  k-means++ init, Lloyd iterations) on it. If the budget covers the pool this is k-means on every
  token.

Reservoir keys are a hash of (seed, block, stream position), so a sample depends on the seed and
the order of the images, never on how they were batched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vprompt.errors import ConfigError, DataError
from vprompt.methods.base import MethodConfig, check_choice
from vprompt.methods.registry import register_method
from vprompt.methods.vpt import VPT, VPTConfig, VPTDeepConfig, VPTShallowConfig, check_vit

Strategy = Literal["random-tokens", "mean-pool", "max-pool", "kmeans"]
"""How a layer's token pool becomes P prompts (see the module docstring and docs/methods/spt.md)."""


# ---------------------------------------------------------------------------------------- config
@dataclass
class SPTConfig(VPTConfig):
    """SPT options, on top of VPT's (``init`` only matters until `SPT.prepare` runs).

    Attributes:
        strategy: how prototypes are computed (see `Strategy`).
        token_budget: most tokens per layer held in memory (reservoir size for ``kmeans``).
        kmeans_iters: most Lloyd iterations of k-means on the reservoir (stops earlier when no
            token changes cluster or the inertia improves by less than 1e-4, relative).
        seed: seeds the reservoir keys and the k-means++ draws.
        max_images: use at most this many images of the loader (all if None).
    """

    name: ClassVar[str] = "spt"
    strategy: Strategy = "kmeans"
    token_budget: int = 65536
    kmeans_iters: int = 20
    seed: int = 0
    max_images: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "strategy", Strategy)
        if self.project > 0:
            raise ConfigError(
                f"{self.name}: prototypes are tokens of the model width, so prompts cannot live in "
                f"project={self.project} dimensions; use project=-1 (or 'vpt-*' for projected prompts)"
            )
        _check_int(self.name, "token_budget", self.token_budget, minimum=1)
        if self.token_budget < self.prompt_len:
            raise ConfigError(
                f"{self.name}: token_budget={self.token_budget} holds fewer tokens than "
                f"prompt_len={self.prompt_len}; raise it to at least {self.prompt_len}"
            )
        _check_int(self.name, "kmeans_iters", self.kmeans_iters, minimum=1)
        _check_int(self.name, "seed", self.seed, minimum=0)
        if self.max_images is not None:
            _check_int(self.name, "max_images", self.max_images, minimum=1)


def _check_int(method: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{method}: {name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class SPTShallowConfig(SPTConfig, VPTShallowConfig):
    """SPT-shallow: P prototype-initialised prompts in front of the first block."""

    name: ClassVar[str] = "spt-shallow"
    deep: ClassVar[bool] = False


@dataclass
class SPTDeepConfig(SPTConfig, VPTDeepConfig):
    """SPT-deep: P prototype-initialised prompts for every block."""

    name: ClassVar[str] = "spt-deep"
    deep: ClassVar[bool] = True


# ---------------------------------------------------------------------------- reservoir keys
_MASK63 = (1 << 63) - 1


def _signed64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for one stream (one block) derived from the user's seed."""
    z = _mix64(torch.tensor([_signed64(seed % (1 << 64))], dtype=torch.int64) * _GOLDEN + _GOLDEN)
    z = _mix64(z + torch.tensor([stream], dtype=torch.int64) * _GOLDEN)
    return int(z.item()) & _MASK63


def token_keys(
    seed: int, stream: int, start: int, n: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Reservoir keys of stream positions ``start .. start + n - 1``: int64 in [0, 2**63).

    Key j is SplitMix64's j-th output for the stream's seed, so keys are independent of batching.
    """
    return _keys(stream_seed(seed, stream), start, n, device)


def _keys(base: int, start: int, n: int, device: torch.device | str) -> torch.Tensor:
    idx = torch.arange(start + 1, start + n + 1, device=device, dtype=torch.int64)  # (n,)
    return _mix64(idx * _GOLDEN + base) & _MASK63


# ------------------------------------------------------------------------------ accumulators
class Accumulator(Protocol):
    """Folds one layer's patch tokens, batch by batch, into P prototypes."""

    buffer_rows: int
    """Token rows allocated (the memory bound: never above the token budget)."""

    def update(self, tokens: torch.Tensor) -> None:
        """Add a batch of patch tokens (B, N, D)."""

    def finalize(self) -> torch.Tensor:
        """The P prototypes (P, D), float32."""

    @property
    def buffer_bytes(self) -> int:
        """Bytes of every buffer held between batches."""


class BottomKReservoir:
    """Uniform sample without replacement of up to ``capacity`` rows from a stream of rows.

    Each row gets a pseudo-random key from (seed, stream, position) and the reservoir keeps the
    rows with the smallest keys (bottom-k sampling): any set of ``capacity`` rows is equally
    likely, and the kept set is the same however the stream is cut into batches. The buffer is
    allocated once at ``capacity`` rows and updated in place.
    """

    def __init__(
        self, capacity: int, dim: int, seed: int, stream: int, device: torch.device | str = "cpu"
    ) -> None:
        self.capacity = capacity
        self.base = stream_seed(seed, stream)
        self.rows = torch.empty(capacity, dim, device=device)  # (K, D)
        self.keys = torch.empty(capacity, dtype=torch.int64, device=device)  # (K,)
        self.size = 0
        self.seen = 0
        self.buffer_rows = capacity

    @property
    def buffer_bytes(self) -> int:
        return self.rows.numel() * self.rows.element_size() + self.keys.numel() * 8

    def add(self, x: torch.Tensor) -> None:
        """Offer rows (n, D) in stream order."""
        keys = _keys(self.base, self.seen, x.shape[0], x.device)  # (n,)
        self.seen += x.shape[0]
        fill = min(self.capacity - self.size, x.shape[0])
        if fill:
            self.rows[self.size : self.size + fill] = x[:fill]
            self.keys[self.size : self.size + fill] = keys[:fill]
            self.size += fill
            x, keys = x[fill:], keys[fill:]
        if x.shape[0]:
            self._replace(x, keys)

    def _replace(self, x: torch.Tensor, keys: torch.Tensor) -> None:
        """Swap in the offered rows whose keys beat the largest kept keys (reservoir full)."""
        cand = (keys < self.keys.max()).nonzero().squeeze(1)  # (m,)
        m = cand.numel()
        if m == 0:
            return
        pooled = torch.cat([self.keys, keys[cand]])  # (K + m,)
        drop = torch.zeros_like(pooled, dtype=torch.bool)  # (K + m,)
        drop[pooled.topk(m).indices] = True  # the m largest keys leave
        slots = drop[: self.capacity].nonzero().squeeze(1)  # evicted slots (e,)
        incoming = cand[(~drop[self.capacity :]).nonzero().squeeze(1)]  # rows taking them (e,)
        self.rows[slots] = x[incoming]
        self.keys[slots] = keys[incoming]

    def sorted_rows(self) -> torch.Tensor:
        """The kept rows in ascending key order (a copy): (size, D)."""
        order = self.keys[: self.size].argsort()  # (size,)
        return self.rows[order]


class PoolAccumulator:
    """``mean-pool`` / ``max-pool``: per-image window pooling averaged over images (exact)."""

    def __init__(
        self, mode: Literal["mean", "max"], prompt_len: int, dim: int, device: torch.device
    ) -> None:
        self.mode = mode
        self.prompt_len = prompt_len
        self.total = torch.zeros(prompt_len, dim, dtype=torch.float64, device=device)  # (P, D)
        self.images = 0
        self.buffer_rows = prompt_len

    @property
    def buffer_bytes(self) -> int:
        return self.total.numel() * self.total.element_size()

    def update(self, tokens: torch.Tensor) -> None:
        x = tokens.transpose(1, 2)  # (B, D, N)
        if self.mode == "mean":
            pooled = F.adaptive_avg_pool1d(x, self.prompt_len)  # (B, D, P)
        else:
            pooled = F.adaptive_max_pool1d(x, self.prompt_len)  # (B, D, P)
        self.total += pooled.sum(0, dtype=torch.float64).T  # (P, D)
        self.images += tokens.shape[0]

    def finalize(self) -> torch.Tensor:
        return (self.total / self.images).float()  # (P, D)


class RandomTokensAccumulator:
    """``random-tokens``: P tokens drawn uniformly without replacement from the layer's pool."""

    def __init__(
        self, prompt_len: int, dim: int, seed: int, layer: int, device: torch.device
    ) -> None:
        self.reservoir = BottomKReservoir(prompt_len, dim, seed, layer, device)
        self.buffer_rows = prompt_len

    @property
    def buffer_bytes(self) -> int:
        return self.reservoir.buffer_bytes

    def update(self, tokens: torch.Tensor) -> None:
        self.reservoir.add(tokens.reshape(-1, tokens.shape[-1]))  # (B * N, D)

    def finalize(self) -> torch.Tensor:
        return self.reservoir.sorted_rows()  # (P, D)


class KMeansAccumulator:
    """``kmeans``: a bounded uniform reservoir of tokens, clustered once the pass is over."""

    def __init__(
        self,
        prompt_len: int,
        capacity: int,
        dim: int,
        seed: int,
        layer: int,
        iters: int,
        device: torch.device,
    ) -> None:
        self.prompt_len = prompt_len
        self.seed = seed
        self.layer = layer
        self.iters = iters
        self.reservoir = BottomKReservoir(capacity, dim, seed, layer, device)
        self.buffer_rows = capacity
        self.result: KMeansResult | None = None

    @property
    def buffer_bytes(self) -> int:
        return self.reservoir.buffer_bytes

    def update(self, tokens: torch.Tensor) -> None:
        self.reservoir.add(tokens.reshape(-1, tokens.shape[-1]))  # (B * N, D)

    def finalize(self) -> torch.Tensor:
        x = self.reservoir.sorted_rows()  # (M, D), order independent of batching
        self.reservoir.rows = self.reservoir.rows.new_empty(0, x.shape[1])  # free the buffer
        self.result = kmeans(x, self.prompt_len, self.iters, stream_seed(self.seed, self.layer))
        return self.result.centres


# ------------------------------------------------------------------------------------ k-means
@dataclass
class KMeansResult:
    """Centres (k, D), the inertia (sum of squared distances) and Lloyd iterations run."""

    centres: torch.Tensor
    inertia: float
    iters: int


def sq_distances(x: torch.Tensor, c: torch.Tensor, xx: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances (M, k) between rows of x (M, D) and c (k, D)."""
    xx = (x * x).sum(1) if xx is None else xx  # (M,)
    d = xx[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]  # (M, k)
    return d.clamp_min_(0.0)


def _draw(weights: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n indices drawn with probability proportional to ``weights`` (M,), with replacement."""
    cdf = weights.double().cumsum(0)  # (M,)
    total = float(cdf[-1])
    if total <= 0.0:  # every point sits on a centre already
        u = torch.randint(weights.numel(), (n,), generator=gen)
        return u.to(weights.device)
    u = torch.rand(n, generator=gen, dtype=torch.float64).to(weights.device) * total  # (n,)
    return torch.searchsorted(cdf, u, right=True).clamp_max_(weights.numel() - 1)  # weight > 0


def kmeans_plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding: each step draws 2 + ln k candidates by D^2 weighting and keeps
    the one that lowers the potential most. Returns k centres (k, D)."""
    m = x.shape[0]
    trials = 2 + int(math.log(k))
    xx = (x * x).sum(1)  # (M,)
    first = int(torch.randint(m, (1,), generator=gen))
    centres = [x[first]]
    d2 = sq_distances(x, x[first : first + 1], xx)[:, 0]  # (M,)
    for _ in range(1, k):
        cand = _draw(d2, trials, gen)  # (t,)
        dc = torch.minimum(sq_distances(x, x[cand], xx), d2[:, None])  # (M, t)
        best = int(dc.sum(0).argmin())
        centres.append(x[cand[best]])
        d2 = dc[:, best]  # (M,)
    return torch.stack(centres)  # (k, D)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int,
    seed: int,
    tol: float = 1e-4,
    sample_size: int = 4096,
) -> KMeansResult:
    """Lloyd's k-means on rows x (M, D), M >= k, seeded by greedy k-means++.

    Coarse to fine: seeding and a first run of Lloyd iterations use a random sample of
    ``max(sample_size, 32 k)`` rows (all rows if M is smaller), then Lloyd iterations on all rows
    refine the centres. Each run stops after ``iters`` updates, or earlier when no row changes
    cluster or an update lowers the inertia by less than ``tol`` (relative). An emptied cluster
    takes the row farthest from its centre. Deterministic for a seed and a row order.

    Returns:
        The centres, their inertia on all rows, and the Lloyd iterations run on all rows.
    """
    gen = torch.Generator().manual_seed(seed)
    x = x.float()
    s = max(sample_size, 32 * k)
    if x.shape[0] > s:
        sample = x[torch.randperm(x.shape[0], generator=gen)[:s].to(x.device)]  # (S, D)
        c, _, _ = _lloyd(sample, kmeans_plusplus(sample, k, gen), iters, tol)
    else:
        c = kmeans_plusplus(x, k, gen)  # (k, D)
    c, inertia, done = _lloyd(x, c, iters, tol)
    return KMeansResult(centres=c, inertia=inertia, iters=done)


def _lloyd(
    x: torch.Tensor, c: torch.Tensor, iters: int, tol: float
) -> tuple[torch.Tensor, float, int]:
    """Lloyd iterations from centres c (k, D): centres, inertia, iterations run."""
    xx = (x * x).sum(1)  # (M,)
    assign, inertia = _assign(x, c, xx)
    done = 0
    for done in range(1, iters + 1):  # noqa: B007 (the count is reported)
        c = _update_centres(x, assign, c, xx)
        new, new_inertia = _assign(x, c, xx)
        converged = torch.equal(new, assign) or inertia - new_inertia <= tol * inertia
        assign, inertia = new, new_inertia
        if converged:
            break
    return c, inertia, done


def _assign(x: torch.Tensor, c: torch.Tensor, xx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Nearest centre of each row (M,) and the inertia (sum of squared distances)."""
    d = torch.addmm((c * c).sum(1)[None, :], x, c.T, alpha=-2.0)  # (M, k): |c|^2 - 2 x.c
    best, assign = d.min(1)  # (M,), (M,)
    return assign, float((best + xx).clamp_min_(0.0).sum())


def _update_centres(
    x: torch.Tensor, assign: torch.Tensor, c: torch.Tensor, xx: torch.Tensor
) -> torch.Tensor:
    """Means of the clusters (k, D); empty clusters move to the worst-served rows."""
    k = c.shape[0]
    sums = torch.zeros_like(c).index_add_(0, assign, x)  # (k, D)
    counts = torch.bincount(assign, minlength=k)  # (k,)
    new = sums / counts.clamp_min(1)[:, None].to(x.dtype)  # (k, D)
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel():
        own = sq_distances(x, c, xx).gather(1, assign[:, None])[:, 0]  # (M,)
        far = own.topk(empty.numel()).indices  # (e,)
        new[empty] = x[far]
    return new


# ------------------------------------------------------------------------------ the frozen pass
@dataclass
class PrototypeStats:
    """What a prototype pass did and held.

    Attributes:
        images: images seen.
        tokens_per_image: patch tokens per image and layer (N).
        buffer_rows: largest token buffer of any layer, in rows (never above ``token_budget``).
        buffer_bytes: bytes of every layer's buffers together.
        forward_seconds: the frozen pass including the streaming updates.
        finalize_seconds: k-means and reservoir read-out after the pass.
        kmeans_iters: Lloyd iterations run per layer (``kmeans`` only).
        kmeans_inertia: mean squared token-to-centre distance on the reservoir, per layer.
    """

    images: int = 0
    tokens_per_image: int = 0
    buffer_rows: int = 0
    buffer_bytes: int = 0
    forward_seconds: float = 0.0
    finalize_seconds: float = 0.0
    kmeans_iters: list[int] = field(default_factory=list)
    kmeans_inertia: list[float] = field(default_factory=list)


class _StopForward(Exception):
    """Raised by the last needed hook: the remaining blocks need not run."""


def _make_accumulator(
    strategy: Strategy,
    layer: int,
    prompt_len: int,
    tokens: torch.Tensor,
    token_budget: int,
    seed: int,
    kmeans_iters: int,
    expected_images: int | None,
) -> Accumulator:
    """The accumulator for one layer, sized from its first batch of tokens (B, N, D)."""
    _, n, dim = tokens.shape
    if strategy in ("mean-pool", "max-pool"):
        if prompt_len > n:
            raise ConfigError(
                f"{strategy}: prompt_len={prompt_len} windows over {n} patch tokens would repeat "
                "tokens (identical prompts stay identical in training); use prompt_len <= "
                f"{n}, or strategy 'kmeans' / 'random-tokens'"
            )
        return PoolAccumulator(
            "mean" if strategy == "mean-pool" else "max", prompt_len, dim, tokens.device
        )
    if strategy == "random-tokens":
        return RandomTokensAccumulator(prompt_len, dim, seed, layer, tokens.device)
    capacity = token_budget if expected_images is None else min(token_budget, expected_images * n)
    capacity = max(capacity, prompt_len)
    return KMeansAccumulator(prompt_len, capacity, dim, seed, layer, kmeans_iters, tokens.device)


def _expected_images(loader: Iterable[Any], max_images: int | None, batch: int) -> int | None:
    """An upper bound on the images the loader gives, capped by ``max_images`` (None: unknown).

    The length of the loader's dataset if it has one, else its number of batches times the
    first batch's size ``batch``.
    """
    n = None
    for sized, per_item in ((getattr(loader, "dataset", None), 1), (loader, batch)):
        try:
            n = len(sized) * per_item  # type: ignore[arg-type]
            break
        except TypeError:
            continue
    if max_images is not None:
        n = max_images if n is None else min(n, max_images)
    return n


def _batch_images(batch: Any) -> torch.Tensor:
    """The images of a loader batch: ``(images, labels)``, ``[images, ...]`` or a tensor."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise DataError(
            f"the loader must yield (images, labels) tensors, got {type(batch).__name__}"
        )
    return batch


@contextmanager
def _block_input_hooks(vit: VisionTransformer, layers: Sequence[int], fn: Any) -> Iterator[None]:
    """Call ``fn(layer, x)`` on the input of each listed block; hooks go away on exit."""
    last = max(layers)

    def make(layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            fn(layer, args[0] if args else kwargs["x"])
            if layer == last:
                raise _StopForward

        return hook

    handles = [
        vit.blocks[i].register_forward_pre_hook(make(i), with_kwargs=True) for i in set(layers)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(
            "-- img/s" if speed is None else f"{speed:.1f} img/s", style="progress.data.speed"
        )


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def compute_prototypes(
    backbone: VisionTransformer,
    loader: Iterable[Any],
    layers: Sequence[int],
    prompt_len: int,
    strategy: Strategy = "kmeans",
    token_budget: int = 65536,
    seed: int = 0,
    *,
    kmeans_iters: int = 20,
    max_images: int | None = None,
    progress: bool = False,
    stats: PrototypeStats | None = None,
) -> torch.Tensor:
    """Prototypes of the patch tokens entering the given blocks of a frozen, prompt-free ViT.

    One pass over ``loader`` under ``torch.no_grad()`` with the backbone in eval mode; blocks after
    the deepest listed one are skipped. Prefix tokens (class, registers) are left out.

    Args:
        backbone: a timm `VisionTransformer`.
        loader: yields ``(images, labels)`` batches (labels ignored), in a fixed order if the
            result is to be reproducible.
        layers: block indices; block 0's input is the patch embedding after the position
            embedding (and ``norm_pre``).
        prompt_len: prototypes per layer (P).
        strategy: see `Strategy`.
        token_budget: most tokens per layer held (``kmeans`` reservoir size).
        seed: seeds reservoir keys and k-means++.
        kmeans_iters: most Lloyd iterations.
        max_images: stop after this many images.
        progress: show a progress bar (images/s, ETA).
        stats: if given, filled with what the pass did (`PrototypeStats`).

    Returns:
        (len(layers), P, D) float32 on the backbone's device.
    """
    if strategy not in get_args(Strategy):
        raise ConfigError(f"strategy={strategy!r} is not one of {list(get_args(Strategy))}")
    depth = len(backbone.blocks)
    if not layers or any(not 0 <= i < depth for i in layers):
        raise ConfigError(
            f"layers must be non-empty block indices in [0, {depth}), got {list(layers)}"
        )
    if token_budget < prompt_len:
        raise ConfigError(f"token_budget={token_budget} is below prompt_len={prompt_len}")
    stats = stats if stats is not None else PrototypeStats()
    param = next(backbone.parameters())
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    expected: int | None = max_images  # refined from the loader at the first batch
    accs: dict[int, Accumulator] = {}

    def on_block_input(layer: int, x: torch.Tensor) -> None:
        tokens = x[:, prefix:].float()  # (B, N, D) patch tokens only
        if layer not in accs:
            accs[layer] = _make_accumulator(
                strategy, layer, prompt_len, tokens, token_budget, seed, kmeans_iters, expected
            )
            stats.tokens_per_image = tokens.shape[1]
        accs[layer].update(tokens)

    start = time.perf_counter()
    was_training = backbone.training
    backbone.eval()
    try:
        with (
            torch.no_grad(),
            _block_input_hooks(backbone, layers, on_block_input),
            _progress(progress) as bar,
        ):
            task = bar.add_task("SPT prototypes", total=expected)
            for images in _image_batches(loader, max_images):
                if stats.images == 0:
                    expected = _expected_images(loader, max_images, images.shape[0])
                    bar.update(task, total=expected)
                images = images.to(device=param.device, dtype=param.dtype)  # (B, C, H, W)
                with suppress(_StopForward):  # the last needed block input was seen
                    backbone.forward_features(images)
                stats.images += images.shape[0]
                bar.update(task, advance=images.shape[0])
    finally:
        backbone.train(was_training)
    stats.forward_seconds = time.perf_counter() - start
    if stats.images == 0:
        raise DataError("the loader gave no images to compute SPT prototypes from")
    return _finalize(accs, layers, prompt_len, strategy, stats)


def _image_batches(loader: Iterable[Any], max_images: int | None) -> Iterator[torch.Tensor]:
    """The loader's image tensors, the last one cut so that at most ``max_images`` are given."""
    left = max_images
    for batch in loader:
        images = _batch_images(batch)
        if left is not None:
            images = images[:left]  # (b <= B, C, H, W)
            left -= images.shape[0]
        if images.shape[0]:
            yield images
        if left is not None and left <= 0:
            return


def _finalize(
    accs: dict[int, Accumulator],
    layers: Sequence[int],
    prompt_len: int,
    strategy: Strategy,
    stats: PrototypeStats,
) -> torch.Tensor:
    """Read the prototypes out of the accumulators: (L, P, D)."""
    pool = stats.images * stats.tokens_per_image
    if strategy in ("random-tokens", "kmeans") and pool < prompt_len:
        raise DataError(
            f"{strategy}: {pool} patch tokens per layer ({stats.images} images) are fewer than "
            f"prompt_len={prompt_len}; give more images"
        )
    stats.buffer_rows = max(a.buffer_rows for a in accs.values())
    stats.buffer_bytes = sum(a.buffer_bytes for a in accs.values())
    start = time.perf_counter()
    out = []
    for i in layers:
        acc = accs[i]
        out.append(acc.finalize())  # (P, D)
        if isinstance(acc, KMeansAccumulator) and acc.result is not None:
            stats.kmeans_iters.append(acc.result.iters)
            stats.kmeans_inertia.append(acc.result.inertia / max(acc.reservoir.size, 1))
    stats.finalize_seconds = time.perf_counter() - start
    return torch.stack(out)  # (L, P, D)


# ------------------------------------------------------------------------------------ methods
class SPT(VPT):
    """VPT whose prompts start as prototypes of the frozen backbone's tokens (call `prepare`).

    Until `prepare` runs the prompts hold VPT's ``init``; ``prepared`` says whether it ran, and
    ``prepare_stats`` what it did.
    """

    config_class: ClassVar[type[MethodConfig]] = SPTConfig

    def __init__(self, config: SPTConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        self.prepared = False
        self.prepare_stats: PrototypeStats | None = None

    def prepare(
        self, backbone: nn.Module, loader: Iterable[Any], progress: bool = True, **kwargs: Any
    ) -> None:
        """Set every prompt layer to prototypes of the tokens entering that block.

        Args:
            backbone: the frozen backbone the method is attached to.
            loader: downstream training images as ``(images, labels)`` batches.
            progress: show a progress bar.
        """
        if kwargs:
            raise TypeError(f"{self.config.name}.prepare got unexpected options {sorted(kwargs)}")
        cfg: SPTConfig = self.config
        vit = check_vit(backbone, cfg.name)
        stats = PrototypeStats()
        protos = compute_prototypes(
            vit,
            loader,
            layers=range(self.prompts.shape[0]),  # shallow: block 0 only
            prompt_len=cfg.prompt_len,
            strategy=cfg.strategy,
            token_budget=cfg.token_budget,
            seed=cfg.seed,
            kmeans_iters=cfg.kmeans_iters,
            max_images=cfg.max_images,
            progress=progress,
            stats=stats,
        )  # (L, P, D)
        with torch.no_grad():
            self.prompts.copy_(protos.to(self.prompts))
        self.prepared = True
        self.prepare_stats = stats


@register_method
class SPTShallow(SPT):
    config_class: ClassVar[type[MethodConfig]] = SPTShallowConfig


@register_method
class SPTDeep(SPT):
    config_class: ClassVar[type[MethodConfig]] = SPTDeepConfig
