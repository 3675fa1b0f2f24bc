"""Request counters, batch-size histogram and latency percentiles for ``GET /metrics``."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

LATENCY_WINDOW = 10_000
"""Percentiles are over the most recent predict requests, at most this many."""


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Metrics:
    """Thread-safe counters updated by the HTTP middleware and the batching worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.requests = 0
        self.by_status: Counter[int] = Counter()
        self.images = 0
        self.batches: Counter[int] = Counter()
        self.images_by_task: Counter[str] = Counter()
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def record_request(self, status: int, latency_s: float | None) -> None:
        """One HTTP response; ``latency_s`` for predict requests only."""
        with self._lock:
            self.requests += 1
            self.by_status[status] += 1
            if latency_s is not None:
                self.latencies_ms.append(1000.0 * latency_s)

    def record_batch(self, tasks: list[str]) -> None:
        """One micro-batch run by the worker, its rows' task names."""
        with self._lock:
            self.batches[len(tasks)] += 1
            self.images += len(tasks)
            self.images_by_task.update(tasks)

    def snapshot(self) -> dict[str, Any]:
        """Everything as JSON-able values."""
        with self._lock:
            lat = list(self.latencies_ms)
            n_batches = sum(self.batches.values())
            errors = sum(n for s, n in self.by_status.items() if s >= 400)
            return {
                "uptime_s": round(time.monotonic() - self.started, 3),
                "requests": self.requests,
                "errors": errors,
                "responses_by_status": {str(s): n for s, n in sorted(self.by_status.items())},
                "images": self.images,
                "images_by_task": dict(self.images_by_task),
                "batches": n_batches,
                "batch_size_mean": (self.images / n_batches) if n_batches else None,
                "batch_size_histogram": {str(k): v for k, v in sorted(self.batches.items())},
                "latency_ms": {
                    "count": len(lat),
                    "p50": percentile(lat, 50),
                    "p90": percentile(lat, 90),
                    "p99": percentile(lat, 99),
                },
            }
