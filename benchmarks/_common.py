"""Helpers shared by the benchmark suites: resident-memory probes, machine facts, statistics."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import resource
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
"""Where the suites write their JSON, Markdown and PNG files by default."""

DIGITS_1K = "builtin:digits?val=0.112&test=0.44"
"""scikit-learn digits carved so that 800 train / 200 val fit; the 791 images left are the test."""

TINY_VIT = "timm:vit_tiny_patch16_224?pretrained=false&img_size=32&depth=2&embed_dim=32&num_heads=2"
"""A two-block random ViT at 32 px for the suites' ``--quick`` modes."""


# ------------------------------------------------------------------------------------- memory
def status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); 0 where it does not exist."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_mb() -> float:
    """Resident memory of this process now, MiB."""
    return status_kb("VmRSS") / 1024


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark (VmHWM) to the current RSS; False if the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def anon_mb() -> float:
    """Anonymous resident memory now (heap, tensors, stacks), MiB: RSS without mapped files."""
    return status_kb("RssAnon") / 1024


def file_mb() -> float:
    """File-backed and shared resident memory now (library code, mapped files), MiB."""
    return (status_kb("RssFile") + status_kb("RssShmem")) / 1024


def peak_rss_mb(reset_ok: bool) -> float:
    """Resident high-water mark, MiB: since `reset_peak_rss` if that worked, else since start."""
    if reset_ok and status_kb("VmHWM"):
        return status_kb("VmHWM") / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


# ------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (falls back to `platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(
    wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16"),
) -> list[str]:
    """Which of the ``wanted`` instruction-set flags the CPU reports."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in wanted if f in flags]


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where unavailable)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """Facts a reader needs to judge the numbers: CPU, cores, library versions, date, command."""
    import timm
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "load_average_start": load_average(),
    }


def command_line() -> str:
    """The command that started this process, as a shell would take it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py") and "benchmarks" in argv[0]:
        module = Path(argv[0]).with_suffix("").parts[-2:]
        argv = ["python", "-m", ".".join(module), *argv[1:]]
    return shlex.join(argv)


# --------------------------------------------------------------------------------- statistics
def median(values: list[float]) -> float | None:
    """Median, or None for no values."""
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(value: float | None, spec: str = ".2f", missing: str = "–") -> str:
    """Format a number, or ``missing`` for None."""
    return missing if value is None else format(value, spec)
