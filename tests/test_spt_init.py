"""SPT's k-means initialisation with the layers batched: the same prototypes as clustering each
layer on its own, checked against a plain per-layer reference implementation."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import vprompt.methods.spt as spt
from vprompt.methods.vpt import embed_tokens

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# --------------------------------------------------------------------- per-layer reference
# One layer at a time, written plainly: greedy k-means++ on a sample, Lloyd on the sample, then
# Lloyd on every row (the description in docs/methods/spt.md).
def ref_sq(x: torch.Tensor, c: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    return (xx[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def ref_draw(w: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    cdf = w.double().cumsum(0)
    total = float(cdf[-1])
    if total <= 0.0:
        return torch.randint(w.numel(), (n,), generator=gen)
    u = torch.rand(n, generator=gen, dtype=torch.float64) * total
    return torch.searchsorted(cdf, u, right=True).clamp_max_(w.numel() - 1)


def ref_plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    xx = (x * x).sum(1)
    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    chosen, d2 = [first], ref_sq(x, x[first : first + 1], xx)[:, 0]
    for _ in range(1, k):
        cand = ref_draw(d2, 2 + int(math.log(k)), gen)
        dc = torch.minimum(ref_sq(x, x[cand], xx), d2[:, None])
        best = int(dc.sum(0).argmin())
        chosen.append(int(cand[best]))
        d2 = dc[:, best]
    return x[chosen]


def ref_assign(x, c, xx):
    best, assign = torch.addmm((c * c).sum(1)[None, :], x, c.T, alpha=-2.0).min(1)
    return assign, float((best + xx).clamp_min_(0.0).sum())


def ref_update(x, assign, c, xx):
    counts = torch.bincount(assign, minlength=c.shape[0])
    new = torch.zeros_like(c).index_add_(0, assign, x) / counts.clamp_min(1)[:, None].float()
    lost = (counts == 0).nonzero().squeeze(1)
    if lost.numel():
        own = ref_sq(x, c, xx).gather(1, assign[:, None])[:, 0]
        new[lost] = x[own.topk(lost.numel()).indices]
    return new


def ref_lloyd(x, c, iters, tol=1e-3):
    xx = (x * x).sum(1)
    assign, inertia = ref_assign(x, c, xx)
    done = 0
    for done in range(1, iters + 1):  # noqa: B007
        c = ref_update(x, assign, c, xx)
        new, new_inertia = ref_assign(x, c, xx)
        stop = torch.equal(new, assign) or inertia - new_inertia <= tol * inertia
        assign, inertia = new, new_inertia
        if stop:
            break
    return c, inertia, done


def ref_kmeans(x, k, iters, seed, sample_size=4096, seed_size=1024):
    gen = torch.Generator().manual_seed(seed)
    m, s = x.shape[0], max(sample_size, 32 * k)
    s0 = min(s, max(seed_size, 20 * k))
    if m > s0:  # seeding on a random subset, Lloyd on a random sample (its superset) if smaller
        sample = x[torch.randperm(m, generator=gen)[:s]]
        c = ref_plusplus(sample[:s0], k, gen)
        if m > s:
            c, _, _ = ref_lloyd(sample, c, iters)
    else:
        c = ref_plusplus(x, k, gen)
    return ref_lloyd(x, c, iters)


def assert_same(result: spt.KMeansResult, ref: tuple) -> None:
    centres, inertia, iters = ref
    assert torch.equal(result.centres, centres)
    assert result.inertia == inertia and result.iters == iters


# ----------------------------------------------------------------------------------- data
def blobs(layers: int, m: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Layers of clustered rows (L, M, D) whose spreads differ, so k-means stops at different
    iterations per layer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        centres = 3 * torch.randn(12, dim, generator=g)
        noise = (0.5 + 0.6 * i) * torch.randn(m, dim, generator=g)
        out.append(centres[torch.randint(12, (m,), generator=g)] + noise)
    return torch.stack(out)


# ------------------------------------------------------------------------- batched k-means
@pytest.mark.parametrize(
    ("m", "sample_size", "seed_size"),
    [
        (300, 4096, 1024),  # seeded on every row, Lloyd on every row
        (900, 200, 1024),  # seeded on the sample (256 rows: 32 k), Lloyd on it, then every row
        (600, 4096, 100),  # seeded on 160 rows (20 k), Lloyd on every row
        (2000, 500, 100),  # seeded on 160 rows, Lloyd on 500, then every row
    ],
)
def test_kmeans_layers_equals_per_layer_reference(m, sample_size, seed_size):
    x = blobs(5, m, 16)
    before = x.clone()
    seeds = [spt.stream_seed(3, i) for i in range(5)]
    results = spt.kmeans_layers(
        x, 8, 30, seeds, sample_size=sample_size, seed_size=seed_size, in_place=True
    )
    assert torch.equal(x, before)  # the coarse phases put the rows back
    for i, result in enumerate(results):
        assert_same(result, ref_kmeans(before[i], 8, 30, seeds[i], sample_size, seed_size))
    assert len({r.iters for r in results}) > 1  # layers stopped at different iterations


def test_kmeans_layers_copying_sample_and_single_layer_api():
    x = blobs(3, 700, 8, seed=1)
    seeds = [11, 12, 13]
    copied = spt.kmeans_layers(x, 5, 20, seeds, sample_size=160)
    in_place = spt.kmeans_layers(x.clone(), 5, 20, seeds, sample_size=160, in_place=True)
    for i in range(3):
        single = spt.kmeans(x[i], 5, 20, seeds[i], sample_size=160)
        assert_same(single, ref_kmeans(x[i], 5, 20, seeds[i], sample_size=160))
        for other in (copied[i], in_place[i]):
            assert_same(other, (single.centres, single.inertia, single.iters))
    gen = torch.Generator().manual_seed(4)
    assert torch.equal(spt.kmeans_plusplus(x[0], 5, gen), ref_plusplus(x[0], 5, gen.manual_seed(4)))


def test_kmeans_layers_emptied_clusters_and_repeated_rows():
    """Fewer distinct rows than centres: k-means++ runs out of weight (small integers, so the
    distances to chosen rows are exactly 0) and clusters empty; all as the reference does."""
    g = torch.Generator().manual_seed(2)
    distinct = torch.randint(0, 3, (2, 5, 6), generator=g).float()  # (L, 5, D)
    x = distinct[:, torch.randint(5, (60,), generator=g)]  # (L, 60, D): 5 distinct rows
    x[1, 30:] = x[1, 0]  # half of layer 1 on one point
    seeds = [5, 6]
    for i, result in enumerate(spt.kmeans_layers(x, 8, 10, seeds)):  # k > distinct rows
        assert_same(result, ref_kmeans(x[i], 8, 10, seeds[i]))


@pytest.mark.parametrize("layers", [1, 4])
def test_kmeans_layers_deterministic_with_threads(layers):
    """Centre sums add rows in row order whatever the thread count (no atomic adds, no split
    of a sum between threads): with two threads the result is the one-thread result."""
    x = blobs(layers, 2400, 32, seed=3)  # above ATen's grain size: kernels go parallel
    seeds = [1, 2, 3, 4][:layers]
    one = spt.kmeans_layers(x, 6, 15, seeds, sample_size=300)
    torch.set_num_threads(2)
    try:
        runs = [spt.kmeans_layers(x, 6, 15, seeds, sample_size=300) for _ in range(2)]
    finally:
        torch.set_num_threads(1)
    for run in runs:
        for a, b in zip(one, run, strict=True):
            assert_same(a, (b.centres, b.inertia, b.iters))


# ------------------------------------------------------------------ through the frozen pass
def tiny_vit(size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=size,
        depth=4,
        embed_dim=32,
        num_heads=2,
        reg_tokens=1,
    ).eval()


def loader(n: int = 24, batch: int = 5, size: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(images, torch.zeros(n, dtype=torch.long)), batch_size=batch)


def pools(vit, data) -> list[torch.Tensor]:
    """Brute force: every block's input patch tokens, (I * N, D) per block in stream order."""
    out: list[list[torch.Tensor]] = [[] for _ in vit.blocks]
    with torch.no_grad():
        for images, _ in data:
            x = embed_tokens(vit, images)
            for i, block in enumerate(vit.blocks):
                out[i].append(x[:, vit.num_prefix_tokens :].reshape(-1, x.shape[-1]))
                x = block(x)
    return [torch.cat(p) for p in out]


@pytest.mark.parametrize(
    ("images", "size", "budget"),
    [
        (24, 64, 10**6),  # every token (384 per layer)
        (24, 64, 150),  # a uniform sample of 150
        (70, 128, 10**6),  # 4480 tokens: k-means++ and the first Lloyd run on a sample of 4096
    ],
)
def test_prototypes_equal_per_layer_kmeans_of_the_reservoir(images, size, budget):
    vit, data = tiny_vit(size), loader(images, 16, size)
    stats = spt.PrototypeStats()
    layers = [0, 1, 3]
    protos = spt.compute_prototypes(
        vit, data, layers, 6, "kmeans", budget, seed=7, kmeans_iters=25, stats=stats
    )
    all_tokens = pools(vit, data)
    pool_size = all_tokens[0].shape[0]
    for j, layer in enumerate(layers):
        keys = spt.token_keys(7, layer, 0, pool_size)
        held = all_tokens[layer][keys.argsort()[:budget]]  # the bottom-k sample, key order
        ref = ref_kmeans(held, 6, 25, spt.stream_seed(7, layer))
        assert torch.equal(protos[j], ref[0])
        assert stats.kmeans_iters[j] == ref[2]
    assert stats.buffer_rows == min(budget, pool_size)


def test_layers_are_independent_and_seeded():
    vit = tiny_vit()

    def run(layers, seed=0, batch=5):
        return spt.compute_prototypes(vit, loader(batch=batch), layers, 5, "kmeans", seed=seed)

    every = run(range(4))
    assert torch.equal(run([2]), every[2:3])  # a layer does not depend on its neighbours
    assert torch.equal(run([3, 1, 1]), every[[3, 1, 1]])  # any order, repeats allowed
    assert torch.equal(run(range(4)), every)  # deterministic
    torch.testing.assert_close(run(range(4), batch=7), every, rtol=0, atol=1e-5)
    assert not torch.equal(run(range(4), seed=1), every)


def test_reservoirs_share_one_buffer_and_release_it():
    stack = spt.LayerStack([0, 2])
    tokens = torch.randn(3, 16, 32)
    accs = [
        spt.KMeansAccumulator(4, 40, 32, 0, i, 10, 1e-3, torch.device("cpu"), stack) for i in (0, 2)
    ]
    for acc in accs:
        acc.update(tokens)
        acc.update(tokens[:1] + 1)
    assert stack.rows is not None and stack.rows.shape == (2, 40, 32)
    assert accs[1].reservoir.rows.data_ptr() == stack.rows[1].data_ptr()
    alone = [spt.KMeansAccumulator(4, 40, 32, 0, i, 10, 1e-3, torch.device("cpu")) for i in (0, 2)]
    for acc in alone:
        acc.update(tokens)
        acc.update(tokens[:1] + 1)
    stack.cluster(accs)
    assert stack.rows is None and accs[0].reservoir.rows.numel() == 0
    for a, b in zip(accs, alone, strict=True):
        assert torch.equal(a.finalize(), b.finalize())
