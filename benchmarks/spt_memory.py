"""Memory and time of SPT prototype initialisation: streaming vs holding every token.

Run ``python -m benchmarks.spt_memory [--quick]``. Each case runs in a fresh process so that its
peak resident memory is its own: the peak is VmHWM after the case minus VmRSS when it starts (the
high-water mark is reset there through ``/proc/self/clear_refs``), which counts torch CPU tensors.

Cases, all on the same random images and the same random-weight backbone:

* ``forward``: one plain frozen ``forward_features`` pass (the floor every method pays).
* ``stream-*``: `vprompt.methods.spt.compute_prototypes` for every block (SPT-deep).
* ``all-tokens-*``: the published approach: hold every block input of every image (prefix
  tokens included), then compute the prototypes from the full pools.

Quality of the bounded-budget k-means is reported as its inertia on the full pool relative to
k-means on the full pool (same algorithm, same seed).

Writes ``benchmarks/results/spt_memory.{json,md}`` (``spt_memory.quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

from benchmarks._common import RESULTS, peak_rss_mb, reset_peak_rss, rss_mb
from vprompt.methods import spt


@dataclass
class Setup:
    """What the benchmark runs on."""

    model: str
    model_kwargs: dict[str, Any]
    images: int
    img_size: int
    batch: int
    prompt_len: int
    kmeans_iters: int = 20
    seed: int = 0


FULL = Setup(
    model="vit_small_patch14_dinov2",
    model_kwargs={"img_size": 112},
    images=512,  # 32768 tokens per layer: the default budget holds half of them
    img_size=112,
    batch=32,
    prompt_len=10,
)
QUICK = Setup(
    model="vit_tiny_patch16_224",
    model_kwargs={"img_size": 64, "depth": 3, "embed_dim": 48, "num_heads": 3},
    images=16,
    img_size=64,
    batch=8,
    prompt_len=4,
)

# name -> (approach, strategy, token_budget, prompt_len multiplier)
EVERY_TOKEN = 2**20
"""A budget above any pool here: streaming k-means on every token."""
CASES: dict[str, tuple[str, str, int, int]] = {
    "forward": ("forward", "", 0, 1),
    "stream-mean-pool": ("stream", "mean-pool", spt.DEFAULT_TOKEN_BUDGET, 1),
    "stream-kmeans": ("stream", "kmeans", spt.DEFAULT_TOKEN_BUDGET, 1),
    "stream-kmeans-every-token": ("stream", "kmeans", EVERY_TOKEN, 1),
    "stream-kmeans-budget4096": ("stream", "kmeans", 4096, 1),
    "stream-kmeans-budget1024": ("stream", "kmeans", 1024, 1),
    "stream-kmeans-5xP": ("stream", "kmeans", spt.DEFAULT_TOKEN_BUDGET, 5),
    "all-tokens-mean-pool": ("all-tokens", "mean-pool", 0, 1),
    "all-tokens-kmeans": ("all-tokens", "kmeans", 0, 1),
    "all-tokens-kmeans-5xP": ("all-tokens", "kmeans", 0, 5),
}


# ----------------------------------------------------------------------------- workloads
def build(setup: Setup) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The random-weight backbone and the image batches (B, 3, H, W)."""
    torch.manual_seed(setup.seed)
    model = timm.create_model(setup.model, pretrained=False, num_classes=0, **setup.model_kwargs)
    model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(setup.seed + 1)
    images = torch.randn(setup.images, 3, setup.img_size, setup.img_size, generator=g)
    return model, list(torch.split(images, setup.batch))


def plain_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in batches:
            model.forward_features(x)


def all_tokens_pools(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hold every block input of every image: per block (I, prefix + N, D)."""
    held: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    handles = [
        blk.register_forward_pre_hook(lambda m, a, i=i: held[i].append(a[0]))
        for i, blk in enumerate(model.blocks)
    ]
    try:
        plain_forward(model, batches)
    finally:
        for h in handles:
            h.remove()
    pools = []
    for i in range(len(held)):
        pools.append(torch.cat(held[i]))  # (I, prefix + N, D)
        held[i] = []
    return pools


def all_tokens_prototypes(
    model: torch.nn.Module, batches: list[torch.Tensor], strategy: str, p: int, setup: Setup
) -> torch.Tensor:
    """The published way: every token in memory, then prototypes per block: (L, P, D)."""
    pools = all_tokens_pools(model, batches)
    s = model.num_prefix_tokens
    out = []
    for i, pool in enumerate(pools):
        patches = pool[:, s:]  # (I, N, D)
        if strategy == "mean-pool":
            out.append(F.adaptive_avg_pool1d(patches.transpose(1, 2), p).mean(0).T)  # (P, D)
        else:
            flat = patches.reshape(-1, patches.shape[-1])  # (I * N, D)
            seed = spt.stream_seed(setup.seed, i)
            out.append(spt.kmeans(flat, p, setup.kmeans_iters, seed).centres)  # (P, D)
    return torch.stack(out)  # (L, P, D)


def run_once(
    name: str, model: torch.nn.Module, batches: list[torch.Tensor], setup: Setup
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """One run of a case: the prototypes (L, P, D) (None for ``forward``) and what it held."""
    approach, strategy, budget, mult = CASES[name]
    p = setup.prompt_len * mult
    if approach == "forward":
        plain_forward(model, batches)
        return None, {}
    if approach == "all-tokens":
        return all_tokens_prototypes(model, batches, strategy, p, setup), {}
    stats = spt.PrototypeStats()
    layers = list(range(len(model.blocks)))
    protos = spt.compute_prototypes(
        model, [(x, None) for x in batches], layers, p, strategy, budget, setup.seed,
        kmeans_iters=setup.kmeans_iters, stats=stats,
    )  # fmt: skip
    return protos, {
        "token_budget": budget,
        "buffer_mb": stats.buffer_bytes / 2**20,
        "pass_seconds": stats.forward_seconds,
        "finalize_seconds": stats.finalize_seconds,
        "kmeans_iters": stats.kmeans_iters,
    }


def run_case(name: str, setup: Setup, repeats: int, save: Path | None) -> dict[str, Any]:
    """A case in this process: best time of ``repeats`` runs, peak RSS above the set-up."""
    approach, strategy, _, mult = CASES[name]
    model, batches = build(setup)
    plain_forward(model, batches[:1])  # warm-up: thread pools, allocator
    reset_ok = reset_peak_rss()
    base_mb = rss_mb()  # read after the reset: RSS can shrink across it
    row: dict[str, Any] = {
        "case": name,
        "approach": approach,
        "strategy": strategy,
        "P": setup.prompt_len * mult,
    }
    times, ratios = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        plain_forward(model, batches)  # paired reference: the load drifts on a shared machine
        forward_seconds = time.perf_counter() - start
        start = time.perf_counter()
        protos, info = run_once(name, model, batches, setup)
        times.append(time.perf_counter() - start)
        ratios.append(times[-1] / forward_seconds)
    row.update(info, seconds=min(times), all_seconds=times)
    row["x_forward"] = statistics.median(ratios)
    row["all_x_forward"] = ratios
    # The kernel's RSS counters are per-CPU approximations (off by a fraction of a MB), so a
    # case that allocates nothing (``forward`` at --quick size) can read slightly below its
    # base: that is counter noise, reported as 0.
    row["peak_rss_mb"] = max(0.0, peak_rss_mb(reset_ok) - base_mb)
    row["peak_method"] = "VmHWM-reset" if reset_ok else "ru_maxrss"
    if protos is not None and save is not None:
        torch.save(protos, save / f"{name}.pt")
    return row


# ------------------------------------------------------------------------------- quality
def kmeans_quality(setup: Setup, rows: list[dict[str, Any]], saved: Path) -> None:
    """Inertia of each k-means result on the full pools, relative to all-tokens k-means."""
    model, batches = build(setup)
    s = model.num_prefix_tokens
    pools = [pool[:, s:].reshape(-1, pool.shape[-1]) for pool in all_tokens_pools(model, batches)]

    def total_inertia(name: str) -> float:
        centres = torch.load(saved / f"{name}.pt", weights_only=True)  # (L, P, D)
        return sum(
            float(spt.sq_distances(x, c).min(1).values.sum())
            for x, c in zip(pools, centres, strict=True)
        )

    refs = {1: total_inertia("all-tokens-kmeans"), 5: total_inertia("all-tokens-kmeans-5xP")}
    for row in rows:
        if row["strategy"] == "kmeans":
            mult = CASES[row["case"]][3]
            row["inertia_vs_all_tokens"] = total_inertia(row["case"]) / refs[mult]


# ---------------------------------------------------------------------------------- report
def published_estimate(images: int, layers: int, tokens: int, dim: int) -> float:
    """GB the all-tokens approach holds: images x layers x tokens x dim x 4 bytes."""
    return images * layers * tokens * dim * 4 / 1e9


def _cells(r: dict[str, Any]) -> list[str]:
    """One table row; empty cells where a case has no such number."""
    iters = r.get("kmeans_iters") or []
    kmeans_s = r.get("finalize_seconds") if r["strategy"] == "kmeans" else None
    return [
        r["case"],
        str(r["P"]),
        str(r.get("token_budget", "")),
        f"{r['seconds']:.2f}",
        f"{r['x_forward']:.2f}",
        "" if kmeans_s is None else f"{kmeans_s:.2f}",
        f"{r['peak_rss_mb']:.1f}",
        f"{r['buffer_mb']:.2f}" if "buffer_mb" in r else "",
        str(max(iters)) if iters else "",
        f"{r['inertia_vs_all_tokens']:.4f}" if "inertia_vs_all_tokens" in r else "",
    ]


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        "# SPT prototype initialisation: memory and time",
        "",
        f"Backbone `{s['model']}` (random weights, {s['model_kwargs']}), {s['images']} random "
        f"images at {s['img_size']} px, batch {s['batch']}, every block (SPT-deep), "
        f"P = {s['prompt_len']} unless the case says 5xP, k-means <= {s['kmeans_iters']} Lloyd "
        f"iterations. {result['env']['cpus']} CPUs, torch {result['env']['torch']}, "
        f"{result['env']['threads']} torch thread(s); seconds are the best of "
        f"{result['env']['repeats']} runs on a machine shared with other jobs (indicative).",
        "",
        "Peak = resident-memory high-water mark during the case minus resident memory before it "
        "(model and images already loaded). Buffer = what the streaming accumulators hold. "
        "x forward = case time / time of a plain frozen forward pass over the same images run "
        "just before it in the same process (median over runs). k-means s = the clustering after the "
        "streaming pass (included in seconds). Inertia vs all-tokens = k-means "
        "objective of the centres on every token, relative to k-means on every token.",
        "",
        "| case | P | budget | seconds | x forward | k-means s | peak MB | buffer MB | "
        "k-means iters (max) | inertia vs all-tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    est = result["estimates"]
    lines += [
        "",
        "Held by the all-tokens approach at scale (every block input, prefix tokens included, "
        "float32):",
        "",
        f"- ViT-B/16, 1000 images, 12 x 197 x 768: {est['vit_b_1000']:.2f} GB "
        f"(streaming k-means at the default budget {spt.DEFAULT_TOKEN_BUDGET}: "
        f"{est['vit_b_stream_default']:.2f} GB; budget 65536: {est['vit_b_stream_65536']:.2f} GB; "
        f"budget 4096: {est['vit_b_stream_4096']:.3f} GB; mean-pool P=50: "
        f"{est['vit_b_meanpool_p50_mb']:.2f} MB)",
        f"- this run ({s['images']} images): {est['this_run'] * 1e3:.1f} MB",
        "",
    ]
    return "\n".join(lines)


def estimates(setup: Setup) -> dict[str, float]:
    model, _ = build(Setup(**{**asdict(setup), "images": 1}))
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    stream = 12 * 768 * (4 + 8 / 768)  # bytes per reservoir row (token + key), 12 layers
    return {
        "vit_b_1000": published_estimate(1000, 12, 197, 768),
        "vit_b_stream_default": spt.DEFAULT_TOKEN_BUDGET * stream / 1e9,
        "vit_b_stream_65536": 65536 * stream / 1e9,
        "vit_b_stream_4096": 4096 * stream / 1e9,
        "vit_b_meanpool_p50_mb": 12 * 50 * 768 * 8 / 2**20,
        "this_run": published_estimate(setup.images, len(model.blocks), tokens, model.embed_dim),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 images")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case")
    parser.add_argument("--repeats", type=int, help="runs per case, best time (2; quick: 1)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_case(args.worker, setup, repeats, args.save)))
        return
    # a fixed mmap threshold makes glibc return freed tensor memory, so RSS follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            cmd = [sys.executable, "-m", "benchmarks.spt_memory", "--worker", name, "--save", tmp]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--threads", str(args.threads), "--repeats", str(repeats)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{name:28s} {r['seconds']:7.2f} s  peak {r['peak_rss_mb']:8.1f} MB", flush=True)
        kmeans_quality(setup, rows, Path(tmp))
    result = {
        "setup": asdict(setup),
        "env": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "repeats": repeats,
        },
        "rows": rows,
        "estimates": estimates(setup),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "spt_memory.quick" if args.quick else "spt_memory"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
