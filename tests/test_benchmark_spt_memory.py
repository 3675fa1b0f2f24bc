"""``python -m benchmarks.spt_memory --quick``: every case runs in its own process and the
report holds what the SPT guide quotes (time against a forward, peak memory, k-means quality)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@pytest.mark.timeout(600)
def test_spt_memory_quick(tmp_path: Path) -> None:
    from benchmarks.spt_memory import CASES

    cmd = [sys.executable, "-m", "benchmarks.spt_memory", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(
        cmd,
        cwd=Path(__file__).resolve().parents[1],  # the repository root: `benchmarks` imports
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "spt_memory.quick.json").read_text())
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == list(CASES)
    for r in rows.values():
        assert r["seconds"] > 0 and math.isfinite(r["x_forward"]) and r["peak_rss_mb"] >= 0
    # the probe sees what a case allocates (at --quick size mostly k-means working memory; the
    # full run's table is where held tokens dominate): a plain forward allocates nothing
    assert rows["all-tokens-kmeans"]["peak_rss_mb"] > rows["forward"]["peak_rss_mb"] + 1
    # k-means on every token is the reference; the streamed ones come within a few percent
    assert rows["all-tokens-kmeans"]["inertia_vs_all_tokens"] == pytest.approx(1.0)
    for name, r in rows.items():
        if name.startswith("stream-kmeans"):
            assert 0.9 < r["inertia_vs_all_tokens"] < 1.05, name
    text = (tmp_path / "spt_memory.quick.md").read_text()
    assert all(f"| {name} |" in text for name in CASES)
    assert "7.26 GB" in text  # the published all-tokens estimate for 1000 ViT-B images
