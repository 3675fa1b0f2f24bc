"""Training speed and peak memory of every method, in one run so that ratios are fair.

Run ``python -m benchmarks.speed [--quick] [--out DIR]``. Writes ``speed.json`` (every repeat's
raw numbers, medians, machine facts, the command), ``speed.md`` (tables and goal checks) and
``speed.png`` (throughput and memory against prompt length); ``speed.quick.*`` with ``--quick``.
``--render JSON`` rewrites the Markdown and plot of a stored run from its raw numbers.

How it measures:

* A training step is forward + cross-entropy + backward + optimizer step (AdamW for ``full``,
  SGD with momentum 0.9 for everything else) on one fixed random batch.
* Every (case, repeat) runs in its own child process forked from a server that has only
  imported torch, timm and vprompt, so that each measurement starts from the same clean state
  and its memory is its own.
* The cases are interleaved, never run to completion one after the other: the run is a series
  of passes, each running a set of cases once in an order rotated from pass to pass, so that a
  change in the machine's load hits every case alike. The goal cases (tier 0) are in ``repeats``
  passes spread over the whole run; the rest run once, cheapest-to-skip last (see `schedule`).
  With a time budget, a case whose expected time no longer fits is skipped and reported as not
  run. Reported numbers are medians over repeats.
* Throughput: ``warmup`` untimed steps, then ``steps`` timed steps; a repeat's step time is the
  mean of its timed steps; images/s = batch / median step time.
* Memory: ``train`` = peak anonymous resident memory over the steps minus the anonymous resident
  memory of the child before it built anything (Python, torch, timm, vprompt loaded, one tiny
  training step run to start thread pools). The peak is the resident high-water mark (VmHWM,
  reset through ``clear_refs`` once the model is built, so random initialisation's transients do
  not count) minus the file-backed pages resident at the end (library code the child paged in).
  Like ``torch.cuda.max_memory_allocated`` it counts weights, gradients, optimizer state and
  activations and leaves out the runtime. Also kept: the absolute peak RSS of the child, and
  ``step``, the peak over the built model (activations, gradients, optimizer state).
* SPT initialisation: `SPT.prepare` (one frozen pass with streaming prototype accumulators, then
  k-means) against a plain frozen ``forward_features`` pass over the same images, each case in
  its own child, interleaved like the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import vprompt.methods  # noqa: F401  (registers every method)
from benchmarks._common import (
    RESULTS,
    anon_mb,
    file_mb,
    fmt,
    load_average,
    machine_info,
    median,
    peak_rss_mb,
    ratio,
    reset_peak_rss,
)
from vprompt.methods import attach

PROMPT_LENGTHS = (1, 10, 50, 200)
VARIANT_P = 50
"""Prompt length at which precision, checkpointing, compile and SPT are measured."""
SPT_BUDGET = 1024
"""Token budget of the second SPT case, small enough to bind on the benchmark's images."""
PROTOCOL_TRAIN_IMAGES = 800
"""Training images of the 1k protocol (800 train / 200 val): the data SPT initialises from."""
NUM_CLASSES = 100
BUDGET_GRACE_S = 300.0
"""A child started within the time budget may overrun it by this much before it is stopped."""

REFERENCE_POINTS = {
    "official VPT code": {"img_s": 0.98, "gib": 4.28},
    "straightforward timm prompt model": {"img_s": 1.22, "gib": 3.34},
    "timm full fine-tune (AdamW)": {"img_s": 1.01, "gib": 3.87},
}
"""Measured elsewhere on this kind of machine: ViT-B/16, 224 px, batch 16, 50 deep prompts, fp32,
2 cores shared with another job. The official code cannot run here, so these are context only."""


# ------------------------------------------------------------------------------------ set-up
@dataclass(frozen=True)
class ModelSpec:
    """A backbone as the benchmark builds it.

    Attributes:
        key: short name used in case ids (``vit-b16``).
        label: what the report calls it.
        timm_name: ``timm.create_model`` name (random weights, ``num_classes=0``).
        kwargs: extra ``create_model`` arguments.
        img_size: input resolution.
        batch: training batch size.
        bf16: whether the bf16 autocast case runs on this backbone.
        compile: whether the torch.compile case runs on this backbone.
        spt_images: images in the small SPT initialisation cases.
        spt_data_images: images in the SPT cases at a downstream data set's size (the 1k
            protocol's 800 training images); 0: not run.
        spt_prompt_len: prompts per block in the SPT cases.
    """

    key: str
    label: str
    timm_name: str
    kwargs: dict[str, Any]
    img_size: int
    batch: int
    bf16: bool = False
    compile: bool = True
    spt_images: int = 32
    spt_data_images: int = 0
    spt_prompt_len: int = VARIANT_P


FULL_SPECS = (
    ModelSpec(
        "vit-b16",
        "ViT-B/16, 224 px",
        "vit_base_patch16_224",
        {},
        224,
        16,
        compile=False,
        spt_images=32,
        spt_data_images=PROTOCOL_TRAIN_IMAGES,
    ),
    ModelSpec(
        "vit-s14",
        "ViT-S/14 (DINOv2 arch.), 112 px",
        "vit_small_patch14_dinov2",
        {"img_size": 112},
        112,
        32,
        bf16=True,
        spt_images=64,
        spt_data_images=PROTOCOL_TRAIN_IMAGES,
    ),
)
QUICK_SPECS = (
    ModelSpec(
        "vit-b16",
        "tiny ViT-B/16 stand-in (depth 2, width 64, 32 px)",
        "vit_base_patch16_224",
        {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2},
        32,
        4,
        bf16=True,
        spt_images=8,
        spt_data_images=24,
        spt_prompt_len=4,
    ),
    ModelSpec(
        "vit-s14",
        "tiny ViT-S/14 stand-in (depth 2, width 48, 28 px)",
        "vit_small_patch14_dinov2",
        {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 2},
        28,
        8,
        bf16=True,
        spt_images=16,
        spt_prompt_len=4,
    ),
)


@dataclass(frozen=True)
class Settings:
    """How much to run (see ``--help``)."""

    quick: bool = False
    repeats: int = 3
    warmup: int = 1
    steps: int = 1
    budget_min: float = 0.0
    compile: bool = True
    compile_timeout: float = 900.0
    case_timeout: float = 1800.0
    threads: int = 0
    only: str = ""


@dataclass(frozen=True)
class Case:
    """One configuration.

    Attributes:
        backbone: `ModelSpec.key`.
        method: a registered method name, or ``frozen-forward`` / ``spt-init``.
        prompt_len: prompt tokens (0 for methods without prompts).
        path: VPT-deep execution path, ``fast`` or ``reference``.
        precision: ``fp32`` or ``bf16`` (autocast on CPU around forward and loss).
        ckpt: activation checkpointing (``set_grad_checkpointing(True)``).
        compile: ``torch.compile`` on the model.
        token_budget: SPT token budget (0: the method's default).
        images: images in an SPT case's pass (0: the backbone's ``spt_images``).
        tier: scheduling priority, 0 (a goal needs it) to 3 (see `case_tier`); not in the id.
    """

    backbone: str
    method: str
    prompt_len: int = 0
    path: str = ""
    precision: str = "fp32"
    ckpt: bool = False
    compile: bool = False
    token_budget: int = 0
    images: int = 0
    tier: int = field(default=3, compare=False)

    @property
    def kind(self) -> str:
        """``spt`` for the SPT initialisation cases, ``train`` for training steps."""
        return "spt" if self.method in ("frozen-forward", "spt-init") else "train"

    @property
    def name(self) -> str:
        """The case without its backbone: ``vpt-deep fast P=50 bf16``."""
        parts = [self.method]
        if self.path:
            parts.append(self.path)
        if self.prompt_len:
            parts.append(f"P={self.prompt_len}")
        if self.precision != "fp32":
            parts.append(self.precision)
        if self.ckpt:
            parts.append("ckpt")
        if self.compile:
            parts.append("compile")
        if self.token_budget:
            parts.append(f"budget={self.token_budget}")
        if self.images:
            parts.append(f"{self.images} img")
        return " ".join(parts)

    @property
    def id(self) -> str:
        return f"{self.backbone}/{self.name}"

    def n_images(self, spec: ModelSpec) -> int:
        """Images in an SPT case's pass."""
        return self.images or spec.spt_images

    @property
    def is_variant(self) -> bool:
        """Precision, checkpointing or compile differs from the plain fp32 eager step."""
        return self.precision != "fp32" or self.ckpt or self.compile


GOAL_CASES = {
    "vit-b16": {
        "full",
        "vpt-deep fast P=1",
        f"vpt-deep fast P={VARIANT_P}",
        "vpt-deep fast P=200",
        f"vpt-deep reference P={VARIANT_P}",
        "frozen-forward",
    },
    "vit-s14": {"full", f"vpt-deep fast P={VARIANT_P}", f"vpt-deep reference P={VARIANT_P}"},
}
"""Cases a goal (or the second backbone's headline ratio) depends on."""


def case_tier(case: Case) -> int:
    """Scheduling priority.

    0: a goal needs it. 1: the rest of the fp32 prompt-length sweep and its reference lines
    (full, linear) and SPT on the other backbone. 2: the other methods at one prompt length,
    checkpointing, bf16, compile, SPT with a small budget. 3: the rest of VPT-shallow's sweep and
    full fine-tuning with checkpointing.
    """
    if case.name in GOAL_CASES.get(case.backbone, set()):
        return 0
    if case.backbone == "vit-b16" and case.kind == "spt" and not case.token_budget:
        return 0  # SPT init and its frozen forward, at both data sizes
    if case.is_variant:
        return 3 if case.method == "full" else 2
    if case.method in ("vpt-deep", "full", "linear", "frozen-forward"):
        return 1
    if case.method == "spt-init":
        return 2 if case.token_budget else 1
    if case.method == "vpt-shallow" and case.prompt_len != VARIANT_P:
        return 3
    return 2


def schedule(repeats: int) -> list[tuple[int, ...]]:
    """The tiers each pass runs: tiers 0-1 first, then a goal pass and an extra tier in turn.

    ``repeats=3``: ``[(0, 1), (0,), (2,), (0,), (3,)]``. Goal cases are measured in ``repeats``
    passes spread over the run; everything else once.
    """
    passes: list[tuple[int, ...]] = [(0, 1)]
    extras: list[tuple[int, ...]] = [(2,), (3,)]
    for _ in range(1, repeats):
        passes.append((0,))
        if extras:
            passes.append(extras.pop(0))
    return passes + extras


def build_cases(specs: Iterable[ModelSpec], settings: Settings) -> list[Case]:
    """Every case of the suite, in a fixed order (see the Markdown for what is left out)."""
    specs = list(specs)
    cases: list[Case] = []
    for spec in specs:
        b = spec.key
        cases += [Case(b, m) for m in ("full", "linear", "bitfit", "pro-tuning")]
        for p in PROMPT_LENGTHS:
            cases += [
                Case(b, "vpt-deep", p, "fast"),
                Case(b, "vpt-deep", p, "reference"),
                Case(b, "vpt-shallow", p),
            ]
        cases += [Case(b, "vpt-deep", VARIANT_P, "fast", ckpt=True), Case(b, "full", ckpt=True)]
        if spec.bf16:
            cases.append(Case(b, "vpt-deep", VARIANT_P, "fast", precision="bf16"))
        if spec.compile and settings.compile and not settings.quick:
            cases.append(Case(b, "vpt-deep", VARIANT_P, "fast", compile=True))
        p = spec.spt_prompt_len
        cases += [
            Case(b, "frozen-forward"),
            Case(b, "spt-init", p),
            Case(b, "spt-init", p, token_budget=SPT_BUDGET),
        ]
        if spec.spt_data_images:
            n = spec.spt_data_images
            cases += [Case(b, "frozen-forward", images=n), Case(b, "spt-init", p, images=n)]
    cases = [dataclasses.replace(c, tier=case_tier(c)) for c in cases]
    if settings.only:
        pattern = re.compile(settings.only)
        cases = [c for c in cases if pattern.search(c.id)]
    return cases


def rotated(cases: list[Case], k: int) -> list[Case]:
    """The order of pass k: rotated so that no case always runs first or last."""
    if not cases:
        return []
    shift = (k * max(1, len(cases) // 3)) % len(cases)
    return cases[shift:] + cases[:shift]


# ------------------------------------------------------------------------------- in the child
def create_backbone(spec: ModelSpec) -> nn.Module:
    """The random-weight timm backbone (seeded, so every child builds the same weights)."""
    torch.manual_seed(0)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.kwargs)
    return model.eval()


def fixed_batch(spec: ModelSpec, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images (n, 3, H, W) and labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, spec.img_size, spec.img_size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, y


def method_options(case: Case, spec: ModelSpec) -> dict[str, Any]:
    """Options for `vprompt.attach` that realise the case."""
    if case.method == "pro-tuning":  # the default 4 groups of blocks, fewer for tiny models
        return {"vit_groups": min(4, int(spec.kwargs.get("depth", 4)))}
    if case.method == "vpt-deep":
        return {"prompt_len": case.prompt_len, "fast": "on" if case.path == "fast" else "off"}
    if case.method in ("vpt-shallow", "spt-init"):
        opts: dict[str, Any] = {"prompt_len": case.prompt_len}
        if case.token_budget:
            opts["token_budget"] = case.token_budget
        return opts
    return {}


def make_optimizer(model: nn.Module, method: str) -> torch.optim.Optimizer:
    """AdamW for full fine-tuning, SGD with momentum 0.9 for every other method."""
    params = model.trainable_parameters()
    if method == "full":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def train_step(
    fn: Callable[[torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
) -> None:
    """Forward + cross-entropy + backward + optimizer step."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(fn(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_train_case(case: Case, spec: ModelSpec, settings: Settings, anon0: float) -> dict[str, Any]:
    """Build the case's model and time its training steps; memory relative to ``anon0``."""
    model = attach(create_backbone(spec), case.method, NUM_CLASSES, **method_options(case, spec))
    model.train()
    model.set_grad_checkpointing(case.ckpt)
    if case.method == "vpt-deep" and model.method.fast_path != (case.path == "fast"):
        raise RuntimeError(
            f"asked for the {case.path} path, got fast_path={model.method.fast_path}"
        )
    opt = make_optimizer(model, case.method)
    x, y = fixed_batch(spec, spec.batch)
    fn = torch.compile(model) if case.compile else model
    anon_model = anon_mb()
    reset_ok = reset_peak_rss()
    warmup = settings.warmup + (1 if case.compile else 0)  # compile may specialise on call 2
    times = []
    for _ in range(warmup + settings.steps):
        start = time.perf_counter()
        train_step(fn, opt, x, y, case.precision == "bf16")
        times.append(time.perf_counter() - start)
    return {
        "warmup_s": times[:warmup],
        "step_s": times[warmup:],
        **memory_report(anon0, anon_model, reset_ok),
        "trainable_params": int(model.parameter_report()["trainable"]),
        "backbone_mb": sum(p.numel() * p.element_size() for p in model.backbone.parameters())
        / 2**20,
    }


def run_spt_case(case: Case, spec: ModelSpec, settings: Settings, anon0: float) -> dict[str, Any]:
    """Time (and measure) a frozen forward pass or SPT-deep prototype initialisation."""
    backbone = create_backbone(spec).requires_grad_(False)
    x, y = fixed_batch(spec, case.n_images(spec), seed=2)
    loader = list(zip(x.split(spec.batch), y.split(spec.batch), strict=True))
    with torch.no_grad():
        backbone.forward_features(x[:2])  # start thread pools and kernels; not timed
    model = None
    if case.method == "spt-init":
        import vprompt.methods.spt  # noqa: F401  (registers spt-*, for older vprompt.methods)

        model = attach(backbone, "spt-deep", NUM_CLASSES, **method_options(case, spec))
    anon_model = anon_mb()
    reset_ok = reset_peak_rss()
    start = time.perf_counter()
    if model is None:
        with torch.no_grad():
            for images, _ in loader:
                backbone.forward_features(images)
    else:
        model.method.prepare(model.backbone, loader, progress=False)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "seconds": seconds,
        "images": case.n_images(spec),
        **memory_report(anon0, anon_model, reset_ok),
    }
    stats = getattr(model.method, "prepare_stats", None) if model is not None else None
    if stats is not None:
        out.update(
            buffer_mb=stats.buffer_bytes / 2**20,
            buffer_rows=stats.buffer_rows,
            pass_s=stats.forward_seconds,
            finalize_s=stats.finalize_seconds,
            kmeans_iters=list(stats.kmeans_iters),
        )
    return out


def warm_runtime() -> None:
    """A tiny training step through the layer types a ViT uses, so that thread pools and
    allocator arenas exist before the baseline is taken (a few MiB)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(2)).train()
    norm, lin = nn.LayerNorm(4), nn.Linear(4, 12)
    params = [*net.parameters(), *norm.parameters(), *lin.parameters()]
    for opt in (torch.optim.SGD(params, lr=0.1, momentum=0.9), torch.optim.AdamW(params)):
        t = lin(F.gelu(norm(net(torch.randn(2, 3, 8, 8))))).view(2, 8, 3, 4)  # (B, T, 3, hd)
        q, k, v = t.transpose(1, 2).unsqueeze(2).unbind(1)  # each (B, 1, T, hd)
        o = F.scaled_dot_product_attention(q, k, v)
        F.cross_entropy(o.flatten(1), torch.tensor([0, 1])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def memory_report(anon0: float, anon_model: float, reset_ok: bool) -> dict[str, float | str]:
    """Peak memory of the measured part of a case, MiB (see the module docstring).

    The anonymous peak is the resident high-water mark minus the file-backed pages resident at
    the end (library code paged in by this child, which is not training memory).
    """
    peak = peak_rss_mb(reset_ok)
    peak_anon = peak - file_mb()
    return {
        "anon_start_mb": anon0,
        "anon_model_mb": anon_model,
        "peak_rss_mb": peak,
        "peak_anon_mb": peak_anon,
        "train_mb": peak_anon - anon0,
        "step_mb": peak_anon - anon_model,
        "peak_source": "VmHWM reset after build" if reset_ok else "ru_maxrss",
    }


def run_case(case: Case, spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """One repeat of one case, in the current (fresh) process."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    warm_runtime()
    anon0 = anon_mb()
    run = run_spt_case if case.kind == "spt" else run_train_case
    result = run(case, spec, settings, anon0)
    result["threads"] = torch.get_num_threads()
    result["load_average"] = load_average()
    return result


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent (the fork server) exits."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(conn: Any, case: dict[str, Any], spec: dict[str, Any], settings: dict[str, Any]) -> None:
    """Child-process entry point: run one case and send its result (or its error) back."""
    die_with_parent()
    try:
        result = run_case(Case(**case), ModelSpec(**spec), Settings(**settings))
    except BaseException as exc:  # report, never hang the parent
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    conn.send(result)
    conn.close()


# ---------------------------------------------------------------------------------- the parent
PRELOAD = ["torch", "timm", "vprompt.methods", "vprompt.methods.spt", "benchmarks._common"]
"""Imported once by the fork server. Not this module: the child re-runs the parent's main module
(``benchmarks.speed``) by name, which must not be in ``sys.modules`` yet."""


def start_context() -> Any:
    """A forkserver context whose server has imported this module (so children start at once)."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile worker pool
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_in_child(
    ctx: Any, case: Case, spec: ModelSpec, settings: Settings, timeout: float
) -> dict[str, Any]:
    """Run one case in a fresh child; a timeout or crash becomes an ``error`` entry."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(send, asdict(case), asdict(spec), asdict(settings)), daemon=True
    )
    start = time.monotonic()
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            result = recv.recv()
        else:
            result = {"error": f"timeout: no result within {timeout:.0f} s", "timeout": True}
    except EOFError:
        proc.join(5)
        result = {"error": f"child exited (code {proc.exitcode}) without a result"}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    result["wall_s"] = time.monotonic() - start
    return result


def describe(case: Case, spec: ModelSpec, res: dict[str, Any]) -> str:
    """One progress line for a finished child."""
    if "error" in res:
        return f"{case.id}: ERROR {res['error'].splitlines()[0]}"
    if case.kind == "spt":
        return f"{case.id}: {res['seconds']:.2f} s, peak +{res['train_mb']:.0f} MiB"
    s = statistics.mean(res["step_s"])
    return (
        f"{case.id}: {s:.2f} s/step ({spec.batch / s:.2f} img/s), "
        f"train +{res['train_mb']:.0f} MiB, warm-up {', '.join(f'{t:.1f}' for t in res['warmup_s'])} s"
    )


@dataclass
class Suite:
    """State of a run: the cases, every repeat's raw result, and how the passes went."""

    specs: dict[str, ModelSpec]
    cases: list[Case]
    settings: Settings
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: dict[str, Any] | None = None
    """Recorded end values (elapsed time, load) when re-rendering a stored run."""

    @property
    def planned(self) -> int:
        """(case, pass) runs the schedule asks for."""
        return sum(
            len([c for c in self.cases if c.tier in t]) for t in schedule(self.settings.repeats)
        )


def expected_seconds(suite: Suite, case: Case) -> float:
    """How long the case should take, from its earlier repeats (0 if it has not run yet)."""
    walls = [r["wall_s"] for r in suite.runs.get(case.id, [])]
    return statistics.mean(walls) if walls else 0.0


def out_of_time(suite: Suite, case: Case) -> bool:
    """The case would end after the time budget (never true without a budget)."""
    budget = suite.settings.budget_min * 60
    elapsed = time.monotonic() - suite.started
    return bool(budget) and elapsed + expected_seconds(suite, case) > budget


def child_timeout(suite: Suite, case: Case) -> float:
    """Seconds a child may take: its case timeout, cut to the budget left plus a grace period."""
    st = suite.settings
    timeout = st.compile_timeout if case.compile else st.case_timeout
    if st.budget_min:
        left = st.budget_min * 60 - (time.monotonic() - suite.started)
        timeout = min(timeout, max(left, 0.0) + BUDGET_GRACE_S)
    return timeout


def run_suite(suite: Suite, write: Callable[[Suite], None]) -> None:
    """Run the passes of `schedule`, writing the outputs after each (at the end for quick)."""
    ctx = start_context()
    settings = suite.settings
    failed: set[str] = set()
    for k, tiers in enumerate(schedule(settings.repeats)):
        todo = rotated([c for c in suite.cases if c.tier in tiers], k)
        todo.sort(key=lambda c: c.precision == "bf16" or c.compile)  # known-slow ones last
        start = time.monotonic()
        for i, case in enumerate(todo, 1):
            head = f"[{time.strftime('%H:%M:%S')} pass {k + 1} {i}/{len(todo)}]"
            if case.id in failed:  # deterministic errors and timeouts are not retried
                continue
            if out_of_time(suite, case):
                suite.not_run.append(f"pass {k + 1}: {case.id}")
                print(f"{head} {case.id}: not run (time budget)", flush=True)
                continue
            spec = suite.specs[case.backbone]
            res = run_in_child(ctx, case, spec, settings, child_timeout(suite, case))
            res["pass"] = k + 1
            suite.runs.setdefault(case.id, []).append(res)
            if "error" in res:
                failed.add(case.id)
            print(f"{head} {describe(case, spec, res)}", flush=True)
        suite.passes.append(
            {
                "pass": k + 1,
                "tiers": list(tiers),
                "cases": len(todo),
                "seconds": time.monotonic() - start,
            }
        )
        if not settings.quick or len(suite.passes) == len(schedule(settings.repeats)):
            write(suite)


# ----------------------------------------------------------------------------------- summary
def summarize(case: Case, spec: ModelSpec, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and ranges) over the repeats of one case."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {
        "id": case.id,
        "case": asdict(case),
        "name": case.name,
        "repeats": len(ok),
        "errors": [r["error"] for r in runs if "error" in r],
    }
    if not ok:
        return out
    for key in ("train_mb", "peak_rss_mb", "step_mb"):
        out[key] = median([r[key] for r in ok])
    if case.kind == "spt":
        secs = [r["seconds"] for r in ok]
        out.update(seconds=median(secs), seconds_min=min(secs), seconds_max=max(secs))
        out["img_s"] = case.n_images(spec) / out["seconds"]
        if "buffer_mb" in ok[0]:
            out["buffer_mb"] = ok[0]["buffer_mb"]
            out["buffer_rows"] = ok[0]["buffer_rows"]
            out["finalize_s"] = median([r["finalize_s"] for r in ok])
        return out
    per_repeat = [statistics.mean(r["step_s"]) for r in ok]
    step = median(per_repeat)
    out.update(
        step_s=step,
        step_s_min=min(per_repeat),
        step_s_max=max(per_repeat),
        img_s=spec.batch / step,
        img_s_min=spec.batch / max(per_repeat),
        img_s_max=spec.batch / min(per_repeat),
        trainable_params=ok[0]["trainable_params"],
        backbone_mb=ok[0]["backbone_mb"],
    )
    if case.compile:
        out["compile_first_step_s"] = median([r["warmup_s"][0] for r in ok])
    return out


def summaries(suite: Suite) -> dict[str, dict[str, Any]]:
    return {
        c.id: summarize(c, suite.specs[c.backbone], suite.runs.get(c.id, [])) for c in suite.cases
    }


# ------------------------------------------------------------------------------------- goals
@dataclass
class Goal:
    """A target from the issue, checked on this run's medians."""

    name: str
    target: str
    value: float | None
    passed: bool | None
    detail: str = ""
    per_pass: list[float] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[self.passed]


def _get(s: dict[str, dict[str, Any]], b: str, name: str, key: str) -> float | None:
    return s.get(f"{b}/{name}", {}).get(key)


def _check(value: float | None, ok: Callable[[float], bool]) -> bool | None:
    return None if value is None else bool(ok(value))


def case_seconds(run: dict[str, Any]) -> float:
    """A repeat's time: mean timed step (training cases) or the whole pass (SPT cases)."""
    return statistics.mean(run["step_s"]) if "step_s" in run else run["seconds"]


def per_pass_ratios(runs: dict[str, list[dict[str, Any]]], a: str, b: str) -> list[float]:
    """time(a) / time(b) within each pass both cases ran in (neighbours in time); a pass of an
    ``--update`` run is its own pass."""
    ta = {_pass_key(r): case_seconds(r) for r in runs.get(a, []) if "error" not in r}
    tb = {_pass_key(r): case_seconds(r) for r in runs.get(b, []) if "error" not in r}
    return [ta[p] / tb[p] for p in sorted(set(ta) & set(tb))]


def _pass_key(run: dict[str, Any]) -> tuple[int, int]:
    return run.get("update", 0), run["pass"]


def evaluate_goals(
    s: dict[str, dict[str, Any]],
    b: str = "vit-b16",
    runs: dict[str, list[dict[str, Any]]] | None = None,
) -> list[Goal]:
    """The issue's goals, on the ViT-B/16 cases (P = 50, fp32, no checkpointing).

    The verdict is on the ratio of medians; ``per_pass`` keeps the same ratio within each pass,
    which shows how much the machine's load moved it.
    """
    runs = runs or {}
    p = VARIANT_P
    fast, ref = f"vpt-deep fast P={p}", f"vpt-deep reference P={p}"
    speedup = ratio(_get(s, b, fast, "img_s"), _get(s, b, ref, "img_s"))
    vs_full = ratio(_get(s, b, fast, "step_s"), _get(s, b, "full", "step_s"))
    p200 = ratio(
        _get(s, b, "vpt-deep fast P=200", "step_s"), _get(s, b, "vpt-deep fast P=1", "step_s")
    )
    mem = ratio(_get(s, b, fast, "train_mb"), _get(s, b, "full", "train_mb"))
    mem_total = ratio(_get(s, b, fast, "peak_rss_mb"), _get(s, b, "full", "peak_rss_mb"))
    spt_names = [k.split("/", 1)[1] for k in s if k.startswith(f"{b}/spt-init")]
    spt_names.sort(key=lambda name: " img" not in name)  # the data-sized case first

    def pp(a: str, c: str) -> list[float]:
        return per_pass_ratios(runs, f"{b}/{a}", f"{b}/{c}")

    goals = [
        Goal(
            f"VPT-deep P={p}: fast path vs reference path throughput",
            ">= 1.20x",
            speedup,
            _check(speedup, lambda v: v >= 1.2),
            "stand-in for '>= 1.5x the official VPT code' (official was 0.80x a straightforward "
            "timm prompt model in the reference measurement)",
            pp(ref, fast),
        ),
        Goal(
            f"VPT-deep P={p} fast step time vs full fine-tune (AdamW)",
            "<= 0.75x",
            vs_full,
            _check(vs_full, lambda v: v <= 0.75),
            per_pass=pp(fast, "full"),
        ),
        Goal(
            "VPT-deep fast step time, P=200 vs P=1",
            "<= 1.15x",
            p200,
            _check(p200, lambda v: v <= 1.15),
            per_pass=pp("vpt-deep fast P=200", "vpt-deep fast P=1"),
        ),
        Goal(
            f"VPT-deep P={p} (fast) peak training memory vs full fine-tune (AdamW)",
            "<= 0.60x",
            mem,
            _check(mem, lambda v: v <= 0.6),
            f"train memory (peak anonymous RSS minus runtime); on absolute peak RSS "
            f"{fmt(mem_total)}x",
        ),
    ]
    for name in [n for n in spt_names if "budget" not in n] or ["spt-init"]:
        fwd = forward_of(name)
        spt_t = ratio(_get(s, b, name, "seconds"), _get(s, b, fwd, "seconds"))
        images = _images_part(name).removesuffix(" img").strip()
        goals.append(
            Goal(
                f"SPT-deep initialisation time vs one frozen forward pass ({name})",
                "<= 1.00x",
                spt_t,
                _check(spt_t, lambda v: v <= 1.0),
                (
                    f"{images} images: the 1k protocol's training split, the data a user "
                    "initialises from"
                    if images == str(PROTOCOL_TRAIN_IMAGES)
                    else f"{images} images"
                )
                if images
                else "a small pass: k-means on the held tokens is a fixed cost, a larger share",
                pp(name, fwd),
            )
        )
    goals += [spt_memory_goal(s, b, name) for name in spt_names]
    return goals


def _images_part(name: str) -> str:
    """The `Case.name` suffix that gives an SPT case's image count (`` 800 img``), or ``""``."""
    return " " + " ".join(name.rsplit(" ", 2)[1:]) if name.endswith(" img") else ""


def forward_of(spt_name: str) -> str:
    """The frozen-forward case over the same images as an SPT case (by name)."""
    return "frozen-forward" + _images_part(spt_name)


def spt_memory_goal(s: dict[str, dict[str, Any]], b: str, name: str) -> Goal:
    """SPT's extra peak over the frozen pass must be explained by its bounded buffers.

    Bound: 1.5 x the accumulators' buffers (the k-means read-out copies one layer's reservoir)
    plus 64 MiB of allocator slack.
    """
    extra = None
    spt, fwd = s.get(f"{b}/{name}", {}), s.get(f"{b}/{forward_of(name)}", {})
    if "step_mb" in spt and "step_mb" in fwd:
        extra = spt["step_mb"] - fwd["step_mb"]
    buf = spt.get("buffer_mb")
    bound = None if buf is None else 1.5 * buf + 64
    passed = None if extra is None or bound is None else extra <= bound
    return Goal(
        f"{name}: extra peak memory over the frozen pass is bounded",
        f"<= 1.5 x buffers + 64 MiB ({fmt(bound, '.0f')} MiB)",
        extra,
        passed,
        f"buffers {fmt(buf, '.1f')} MiB ({spt.get('buffer_rows', '–')} rows per layer)",
    )


# ----------------------------------------------------------------------------------- outputs
def write_outputs(suite: Suite, out: Path, stem: str, info: dict[str, Any]) -> None:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` from what has run so far."""
    out.mkdir(parents=True, exist_ok=True)
    s = summaries(suite)
    goals = evaluate_goals(s, runs=suite.runs)
    status = run_status(suite)
    finished = suite.finished or {  # a re-rendered run keeps its recorded values
        "elapsed_s": time.monotonic() - suite.started,
        "load_average_end": load_average(),
    }
    result = {
        "status": status,
        "machine": info,
        "settings": asdict(suite.settings),
        "models": {k: asdict(v) for k, v in suite.specs.items()},
        "schedule": [list(t) for t in schedule(suite.settings.repeats)],
        "passes": suite.passes,
        "not_run": suite.not_run,
        **finished,
        "goals": [asdict(g) | {"verdict": g.verdict} for g in goals],
        "summary": s,
        "runs": {c.id: suite.runs.get(c.id, []) for c in suite.cases},
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(suite, s, goals, info | finished, status, stem)
    (out / f"{stem}.md").write_text(md)
    plot(suite, s, out / f"{stem}.png")


def run_status(suite: Suite) -> str:
    """``complete``, or why the run is partial."""
    done = sum(len(v) for v in suite.runs.values())
    total = len(schedule(suite.settings.repeats))
    if len(suite.passes) == total and not suite.not_run:
        return "complete"
    if suite.not_run:
        return (
            f"partial: {done} of {suite.planned} planned runs done; {len(suite.not_run)} skipped "
            f"because the {suite.settings.budget_min:.0f} min time budget ran out"
        )
    return f"partial: {len(suite.passes)} of {total} passes done so far"


def why_missing(r: dict[str, Any]) -> str:
    """Table cell for a case without numbers: its error, or that the time budget ran out."""
    if r["errors"]:
        return "error: " + r["errors"][0].splitlines()[0][:110]
    return "not run (time budget)"


def _train_row(r: dict[str, Any], full: dict[str, Any]) -> str:
    if not r.get("repeats"):
        return f"| {r['name']} | – | – | – | – | – | – | – | {why_missing(r)} |"
    return (
        f"| {r['name']} | {r['img_s']:.3g} | {r['step_s']:.3g} [{r['step_s_min']:.3g}–"
        f"{r['step_s_max']:.3g}] | {fmt(ratio(r['step_s'], full.get('step_s')))} | "
        f"{r['train_mb']:.0f} | {fmt(ratio(r['train_mb'], full.get('train_mb')))} | "
        f"{r['peak_rss_mb']:.0f} | {r['trainable_params']:,} | {r['repeats']} |"
    )


def markdown(
    suite: Suite,
    s: dict[str, dict[str, Any]],
    goals: list[Goal],
    info: dict[str, Any],
    status: str,
    stem: str,
) -> str:
    """The report: set-up, goal checks, one table per backbone, SPT, notes."""
    st = suite.settings
    lines = [
        "# Training speed and memory" + (" (--quick: tiny stand-in models)" if st.quick else ""),
        "",
        f"**Status: {status}.**" if status != "complete" else "Status: complete.",
        "",
        f"Command: `{info['command']}`  ",
        *(
            [f"Report re-rendered from the stored raw numbers on {info['rendered']}.  "]
            if info.get("rendered")
            else []
        ),
        *(
            f"Update {u.get('n', i)}: re-measured on {u['date']} by `{u['command']}` (load average "
            f"{u['load_average_start']} at start, {u['load_average_end']} at end; "
            f"{len(u['passes'])} pass(es), {u['elapsed_s'] / 60:.1f} min): "
            f"{', '.join(f'`{c}`' for c in u['cases'])}. Their numbers below are from that run; "
            "ratios to cases it did not re-measure compare two runs.  "
            for i, u in enumerate(info.get("updates", []), 1)
        ),
        f"Machine: {info['cpu_model']}, {info['logical_cores']} logical cores "
        f"({info['torch_threads']} torch threads), flags {', '.join(info['cpu_flags']) or 'none'}, "
        f"{info['memory_gib']} GiB; torch {info['torch']}, timm {info['timm']}, Python "
        f"{info['python']}; {info['date']}. Load average at start {info['load_average_start']}, "
        f"at end {info['load_average_end']}.",
        "",
        *noise_lines(suite),
        "",
        "Every repeat of every case ran in a fresh child process. Cases were interleaved in "
        f"passes (tiers per pass: {schedule(st.repeats)}; tier 0 = what a goal needs, run "
        f"{st.repeats} times; tiers 1-3 once), each pass in a rotated order; "
        f"{len(suite.passes)} pass(es) took {sum(p['seconds'] for p in suite.passes) / 60:.1f} min. "
        f"Per repeat: {st.warmup} warm-up step(s) (+1 for compile), then {st.steps} timed "
        "step(s). Numbers are medians over repeats, [min–max] over repeats.",
        "",
        "Training step = forward + cross-entropy + backward + optimizer step (AdamW for `full`, "
        "SGD momentum 0.9 otherwise), one fixed random batch, random weights, 100 classes. "
        "**Train memory** = peak anonymous resident memory during the steps (VmHWM minus "
        "resident library pages) minus the child's anonymous resident memory before it built "
        "anything (Python + torch + timm loaded, thread pools started): weights, gradients, "
        "optimizer state and activations, like `torch.cuda.max_memory_allocated`. "
        "Peak RSS is the child's absolute high-water mark, runtime and libraries included.",
        "",
        "## Goals",
        "",
        "The verdict is on the ratio of the medians. *Per pass* gives the same ratio within each "
        "pass in which both cases ran (they ran minutes apart, not seconds).",
        "",
        "| goal | target | measured | verdict | per pass | note |",
        "|---|---|---:|---|---|---|",
    ]
    for g in goals:
        per_pass = ", ".join(f"{v:.2f}" for v in g.per_pass)
        lines.append(
            f"| {g.name} | {g.target} | {fmt(g.value, '.3f')} | **{g.verdict}** | {per_pass} | "
            f"{g.detail} |"
        )
    lines += context_lines(s)
    for spec in suite.specs.values():
        lines += backbone_tables(suite, s, spec)
    lines += notes(suite, s)
    lines += ["", f"Plot: `{stem}.png`. Raw per-repeat numbers: `{stem}.json`.", ""]
    return "\n".join(lines)


def noise_lines(suite: Suite) -> list[str]:
    """How much the shared machine moved the numbers: spread of repeats of the same case."""
    time_spread, mem_spread = [], []
    for case_id, runs in suite.runs.items():
        ok = [r for r in runs if "error" not in r]
        if len(ok) < 2:
            continue
        times = [case_seconds(r) for r in ok]
        time_spread.append((max(times) / min(times), case_id))
        mems = [r["train_mb"] for r in ok]
        mem_spread.append(max(mems) / max(min(mems), 1.0))
    if not time_spread:
        return []
    worst, worst_id = max(time_spread)
    typical = statistics.median(t for t, _ in time_spread)
    loads = [r["load_average"][0] for v in suite.runs.values() for r in v if r.get("load_average")]
    return [
        "**How far to trust the times.** The machine was shared: the 1-minute load average seen "
        f"by the children ranged from {min(loads):.1f} to {max(loads):.1f} on "
        f"{os.cpu_count()} cores. The slowest repeat of a case was up to {worst:.2f}x its "
        f"fastest (`{worst_id}`; median over repeated cases {typical:.2f}x), because the load "
        "changed between passes. Ratios between cases, and the goal verdicts on time, can move by "
        "that much; compare the *per pass* column. Train memory did not depend on the load: "
        f"repeats of a case agree within {100 * (max(mem_spread) - 1):.1f}%.",
    ]


def context_lines(s: dict[str, dict[str, Any]], b: str = "vit-b16") -> list[str]:
    """How this run relates to the reference measurement of the official VPT code."""
    fast = s.get(f"{b}/vpt-deep fast P={VARIANT_P}", {})
    ref = s.get(f"{b}/vpt-deep reference P={VARIANT_P}", {})
    lines = [
        "",
        "Context (not a pass/fail): the reference measurement, on another run at ViT-B/16 224 px, "
        "batch 16, 50 deep prompts, fp32, found the official VPT code at "
        + ", ".join(f"{k} {v['img_s']} img/s / {v['gib']} GiB" for k, v in REFERENCE_POINTS.items())
        + ".",
    ]
    sp = ratio(fast.get("img_s"), ref.get("img_s"))
    if sp is not None:
        official = REFERENCE_POINTS["straightforward timm prompt model"]["img_s"]
        official /= REFERENCE_POINTS["official VPT code"]["img_s"]
        lines.append(
            f"Taking our reference path as the straightforward timm prompt model, the fast path "
            f"would be about {sp * official:.2f}x the official code's throughput (goal 1.5x). "
            f"Absolute numbers here: fast {fast['img_s']:.2f} img/s, reference "
            f"{ref['img_s']:.2f} img/s (another machine and load than the reference "
            "measurement: compare ratios, not absolute numbers)."
        )
    return lines


def backbone_tables(suite: Suite, s: dict[str, dict[str, Any]], spec: ModelSpec) -> list[str]:
    """Training table (plain fp32 eager, then variants) and the SPT table for one backbone."""
    rows = [s[c.id] for c in suite.cases if c.backbone == spec.key]
    full = s.get(f"{spec.key}/full", {})
    head = [
        "| case | img/s | s/step [min–max] | step vs full | train MiB | mem vs full | "
        "peak RSS MiB | trainable params | repeats |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    plain = [
        r for r in rows if Case(**r["case"]).kind == "train" and not Case(**r["case"]).is_variant
    ]
    variants = [
        r for r in rows if Case(**r["case"]).kind == "train" and Case(**r["case"]).is_variant
    ]
    lines = ["", f"## {spec.label}, batch {spec.batch}", "", "fp32, eager, no checkpointing:", ""]
    lines += head + [_train_row(r, full) for r in plain]
    if variants:
        lines += ["", f"Variants at P={VARIANT_P} (and full fine-tune for comparison):", ""]
        lines += head + [_train_row(r, full) for r in variants]
        for r in variants:
            if "compile_first_step_s" in r:
                lines.append(
                    f"\n`{r['name']}`: first step (compile + run) took "
                    f"{r['compile_first_step_s']:.0f} s."
                )
    spt = [r for r in rows if Case(**r["case"]).kind == "spt"]
    if spt:
        lines += [
            "",
            f"SPT-deep initialisation (batch {spec.batch}; `N img`: N images, else "
            f"{spec.spt_images}) vs a frozen forward pass over the same images:",
            "",
            "| case | seconds [min–max] | x forward | peak over model MiB | train MiB | "
            "buffers MiB | k-means etc. s | repeats |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in spt:
            if not r.get("repeats"):
                lines.append(f"| {r['name']} | – | – | – | – | – | – | {why_missing(r)} |")
                continue
            fwd = s.get(f"{spec.key}/{forward_of(r['name'])}", {})
            lines.append(
                f"| {r['name']} | {r['seconds']:.2f} [{r['seconds_min']:.2f}–{r['seconds_max']:.2f}] | "
                f"{fmt(ratio(r['seconds'], fwd.get('seconds')))} | {r['step_mb']:.0f} | "
                f"{r['train_mb']:.0f} | {fmt(r.get('buffer_mb'), '.1f')} | "
                f"{fmt(r.get('finalize_s'))} | {r['repeats']} |"
            )
    return lines


def notes(suite: Suite, s: dict[str, dict[str, Any]]) -> list[str]:
    """What was left out and why, and any case that failed."""
    lines = [
        "",
        "## What is not measured, and why",
        "",
        f"- Precision, checkpointing and compile only at P={VARIANT_P} with the fast path (and full "
        "fine-tuning with checkpointing): the prompt-length trend is the fp32 table's.",
        "- No reference-path variants: checkpointing and bf16 act on it as on the fast path; the "
        "fp32 fast/reference ratio is the goal.",
        "- SPT training steps are VPT-deep's (same module, same fast path); only SPT's "
        "initialisation is new, and it is measured on its own.",
        "- `linear` here runs the frozen backbone every step; the product's linear probe caches "
        "features once, so its real training cost is one forward per image.",
        "- bf16 only for ViT-S, VPT-deep fast P=50: this CPU has no native bf16 instructions "
        "(no avx512_bf16 / amx_bf16), and in a probe before this run bf16 autocast took "
        "150-225 s per step against 12 s in fp32 for that case; ViT-B and full fine-tuning in "
        "bf16 would have taken a large part of the time budget to show the same thing.",
        "- `full` (and `bitfit`) train a copy of the backbone; the frozen original is freed "
        "(nothing in these cases holds it), so their memory is a plain fine-tune's.",
    ]
    if suite.settings.quick:
        lines.append(
            "- `--quick` skips torch.compile (its warm-up alone exceeds the quick budget)."
        )
    elif not suite.settings.compile:
        lines.append("- torch.compile was switched off for this run (`--no-compile`).")
    else:
        skipped = [s.label for s in suite.specs.values() if not s.compile]
        if skipped:
            lines.append(
                f"- torch.compile not tried on {', '.join(skipped)}: a probe before this run spent "
                "169 s compiling ViT-S (first step) and then ran no faster than eager; ViT-B's "
                "compile would have cost a large part of the time budget."
            )
    if suite.not_run:
        lines += ["", "## Not run (time budget)", ""]
        lines += [f"- {item}" for item in suite.not_run]
    failed = [r for r in s.values() if r["errors"]]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            lines.append(f"- `{r['id']}`: {r['errors'][0].splitlines()[0]}")
    return lines


def plot(suite: Suite, s: dict[str, dict[str, Any]], path: Path) -> None:
    """img/s and train memory against prompt length, one column per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(suite.specs.values())
    fig, axes = plt.subplots(2, len(specs), figsize=(6 * len(specs), 8), squeeze=False)
    series = [
        ("vpt-deep fast", "VPT-deep fast", "tab:green", "o"),
        ("vpt-deep reference", "VPT-deep reference", "tab:red", "s"),
        ("vpt-shallow", "VPT-shallow", "tab:blue", "^"),
    ]
    lines_h = [("full", "full (AdamW)", "black", "--"), ("linear", "linear", "grey", ":")]
    for col, spec in enumerate(specs):
        mem = [r.get("train_mb") or 0.0 for r in s.values() if r["id"].startswith(spec.key)]
        gib = max(mem, default=0.0) > 2048
        for row, key in enumerate(("img_s", "train_mb")):
            ax = axes[row][col]
            scale = 1.0 if key == "img_s" or not gib else 1 / 1024
            for prefix, label, color, marker in series:
                pts = [
                    (p, s[f"{spec.key}/{prefix} P={p}"])
                    for p in PROMPT_LENGTHS
                    if s.get(f"{spec.key}/{prefix} P={p}", {}).get(key) is not None
                ]
                if not pts:
                    continue
                xs = [p for p, _ in pts]
                ys = [r[key] * scale for _, r in pts]
                if key == "img_s":
                    err = [
                        [r[key] - r["img_s_min"] for _, r in pts],
                        [r["img_s_max"] - r[key] for _, r in pts],
                    ]
                    ax.errorbar(
                        xs, ys, yerr=err, color=color, marker=marker, label=label, capsize=3
                    )
                else:
                    ax.plot(xs, ys, color=color, marker=marker, label=label)
            for name, label, color, style in lines_h:
                v = s.get(f"{spec.key}/{name}", {}).get(key)
                if v is not None:
                    ax.axhline(v * scale, color=color, linestyle=style, label=label)
            ax.set_xscale("log")
            ax.set_xticks(PROMPT_LENGTHS, [str(p) for p in PROMPT_LENGTHS])
            ax.set_xlabel("prompt length P")
            unit = "GiB" if gib else "MiB"
            ax.set_ylabel("training images / s" if key == "img_s" else f"train memory ({unit})")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{spec.label}, batch {spec.batch}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    status = run_status(suite)
    fig.suptitle(
        "Training throughput and peak memory vs prompt length (fp32, median over repeats)"
        + ("" if status == "complete" else f"\n{status}"),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, finishes in < 60 s")
    parser.add_argument("--out", type=Path, help=f"output directory (default {RESULTS})")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: rewrite the Markdown and plot of a stored run from its raw numbers",
    )
    parser.add_argument(
        "--update",
        type=Path,
        metavar="JSON",
        help="measure the cases --only selects (their goal cases and frozen baselines interleaved "
        "as usual) and replace their numbers in this stored run; the other cases keep theirs",
    )
    parser.add_argument("--repeats", type=int, help="repeats of the goal cases (default 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps per repeat (default 1)")
    parser.add_argument("--steps", type=int, help="timed steps per repeat (default 1; quick 2)")
    parser.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="skip runs that would end after this many minutes (default 60; quick: none)",
    )
    parser.add_argument(
        "--batch",
        action="append",
        default=[],
        metavar="KEY=N",
        help="batch size per backbone, e.g. --batch vit-b16=8 (keys: vit-b16, vit-s14)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument(
        "--compile-timeout", type=float, default=900.0, help="seconds per compile case"
    )
    parser.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per other case")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's own; 1 with --quick)"
    )
    parser.add_argument("--only", default="", help="regex on case ids (for development)")
    return parser.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        quick=quick,
        repeats=args.repeats or 3,
        warmup=1 if args.warmup is None else args.warmup,
        steps=args.steps or (2 if quick else 1),
        budget_min=(0.0 if quick else 60.0) if args.budget_min is None else args.budget_min,
        compile=not args.no_compile,
        compile_timeout=args.compile_timeout,
        case_timeout=args.case_timeout,
        threads=args.threads if args.threads is not None else (1 if quick else 0),
        only=args.only,
    )


def make_specs(quick: bool, batches: list[str]) -> dict[str, ModelSpec]:
    specs = {s.key: s for s in (QUICK_SPECS if quick else FULL_SPECS)}
    for item in batches:
        key, _, value = item.partition("=")
        if key not in specs or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--batch {item!r}: expected KEY=N with KEY in {sorted(specs)}")
        specs[key] = dataclasses.replace(specs[key], batch=int(value))
    return specs


def load_suite(path: Path) -> tuple[Suite, dict[str, Any]]:
    """A stored run (its raw per-repeat numbers) and its machine facts, from its JSON."""
    data = json.loads(path.read_text())
    suite = Suite(
        specs={k: ModelSpec(**v) for k, v in data["models"].items()},
        cases=[Case(**v["case"]) for v in data["summary"].values()],
        settings=Settings(**data["settings"]),
        runs={k: v for k, v in data["runs"].items() if v},
        passes=data["passes"],
        not_run=data["not_run"],
        finished={k: data[k] for k in ("elapsed_s", "load_average_end")},
    )
    return suite, data["machine"]


def render(path: Path, out: Path | None) -> None:
    """Rewrite ``<stem>.{json,md,png}`` of a stored run; its raw numbers stay as they were."""
    suite, info = load_suite(path)
    now = machine_info()
    info["rendered"] = f"{now['date']} by `{now['command']}`"
    write_outputs(suite, out or path.parent, path.stem, info)
    print(f"re-rendered {path} ({run_status(suite)})")


def update(path: Path, suite: Suite, info: dict[str, Any]) -> None:
    """Run ``suite`` (a selection of cases) and write it into the stored run at ``path``: the
    selected cases' repeats replace the stored ones, the rest keep theirs. Ratios between a
    re-measured case and one that was not come from two runs; the report says which cases were
    re-measured and when."""
    stored, stored_info = load_suite(path)
    if stored.specs.keys() != suite.specs.keys() or stored.settings.quick != suite.settings.quick:
        raise SystemExit(f"--update {path}: stored with other models or --quick setting")
    if stored.specs != suite.specs:
        changed = sorted(k for k in suite.specs if suite.specs[k] != stored.specs[k])
        print(f"model settings changed since the stored run: {changed} (taking the new ones)")
    run_suite(suite, lambda st: None)
    earlier = stored_info.get("updates", [])
    n_update = max((u.get("n", i) for i, u in enumerate(earlier, 1)), default=0) + 1
    for runs in suite.runs.values():
        for r in runs:
            r["update"] = n_update
    ids = {c.id for c in suite.cases}
    new = {c.id: c for c in suite.cases}
    stored.cases = [new.pop(c.id, c) for c in stored.cases] + list(new.values())
    stored.specs = suite.specs
    stored.runs = {k: v for k, v in stored.runs.items() if k not in ids} | {
        k: v for k, v in suite.runs.items() if k in ids
    }
    stored.not_run = [n for n in stored.not_run if n.split(": ", 1)[-1] not in ids]
    stored.not_run += [f"update: {n}" for n in suite.not_run]
    end = {"elapsed_s": time.monotonic() - suite.started, "load_average_end": load_average()}
    stored_info["updates"] = [  # an earlier update whose cases were all re-measured is gone
        *(u for u in earlier if not set(u["cases"]) <= ids),
        {**info, **end, "n": n_update, "cases": sorted(ids), "passes": suite.passes},
    ]
    write_outputs(stored, path.parent, path.stem, stored_info)
    print(f"updated {len(ids)} case(s) in {path} ({run_status(stored)})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        render(args.render, args.out)
        return
    if args.update and not args.only:
        raise SystemExit("--update needs --only (the cases to re-measure)")
    args.out = args.out or RESULTS
    settings = make_settings(args)
    specs = make_specs(args.quick, args.batch)
    cases = build_cases(specs.values(), settings)
    if not cases:
        raise SystemExit(f"--only {settings.only!r} matches no case")
    info = machine_info()
    stem = "speed.quick" if settings.quick else "speed"
    suite = Suite(specs=specs, cases=cases, settings=settings)
    target = args.update or f"{args.out}/{stem}.*"
    print(f"{len(cases)} cases, {suite.planned} runs planned -> {target}", flush=True)
    if args.update:
        update(args.update, suite, info)
        return
    run_suite(suite, lambda st: write_outputs(st, args.out, stem, info))
    print(f"wrote {args.out / stem}.json, .md and .png ({run_status(suite)})")


if __name__ == "__main__":
    from benchmarks import speed as _speed  # children must unpickle benchmarks.speed, not __main__

    _speed.main(sys.argv[1:])
