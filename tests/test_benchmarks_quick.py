"""The speed benchmark's ``--quick`` run: it finishes, and its JSON, Markdown and PNG agree."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks import speed  # the repository root is on pytest's pythonpath

ROOT = Path(__file__).resolve().parents[1]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Run ``python -m benchmarks.speed --quick`` into a temporary directory once."""
    out = tmp_path_factory.mktemp("speed")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "benchmarks.speed", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "speed.quick.json").read_text())


@pytest.mark.slow
def test_quick_writes_all_outputs(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = quick_run
    for suffix in ("json", "md", "png"):
        assert (out / f"speed.quick.{suffix}").stat().st_size > 0
    assert (out / "speed.quick.png").read_bytes()[:8] == PNG_MAGIC
    assert result["status"] == "complete"
    machine = result["machine"]
    for key in ("cpu_model", "logical_cores", "torch", "date", "command"):
        assert machine[key]
    assert "benchmarks.speed --quick" in machine["command"]


@pytest.mark.slow
def test_quick_every_case_ran_without_error(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = quick_run
    repeats = result["settings"]["repeats"]
    assert not result["not_run"]
    assert len(result["passes"]) == len(result["schedule"])
    for case_id, runs in result["runs"].items():
        assert runs, case_id
        assert not [r["error"] for r in runs if "error" in r], case_id
        tier = result["summary"][case_id]["case"]["tier"]
        assert len(runs) == (repeats if tier == 0 else 1), case_id
        passes = [r["pass"] for r in runs]
        assert passes == sorted(set(passes))  # one repeat per pass, in pass order
        assert all(tier in result["schedule"][p - 1] for p in passes)


@pytest.mark.slow
def test_quick_medians_match_raw_numbers(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = quick_run
    for case_id, s in result["summary"].items():
        runs = result["runs"][case_id]
        assert s["repeats"] == len(runs)
        assert s["train_mb"] == pytest.approx(statistics.median(r["train_mb"] for r in runs))
        if s["case"]["method"] in ("frozen-forward", "spt-init"):
            assert s["seconds"] == pytest.approx(statistics.median(r["seconds"] for r in runs))
            continue
        per_repeat = [statistics.mean(r["step_s"]) for r in runs]
        assert all(len(r["step_s"]) == result["settings"]["steps"] for r in runs)
        assert s["step_s"] == pytest.approx(statistics.median(per_repeat))
        batch = result["models"][s["case"]["backbone"]]["batch"]
        assert s["img_s"] == pytest.approx(batch / s["step_s"])
        assert s["img_s_min"] <= s["img_s"] <= s["img_s_max"]


@pytest.mark.slow
def test_quick_markdown_shows_every_goal_and_case(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = quick_run
    md = (out / "speed.quick.md").read_text()
    assert len(result["goals"]) >= 5
    for goal in result["goals"]:
        assert goal["verdict"] in ("PASS", "FAIL", "NOT MEASURED")
        assert goal["verdict"] != "NOT MEASURED", goal["name"]
        assert f"| {goal['name']} |" in md
        assert f"**{goal['verdict']}**" in md
    for s in result["summary"].values():
        assert f"| {s['name']} |" in md


def test_schedule_repeats_goal_cases_and_runs_the_rest_once() -> None:
    assert speed.schedule(3) == [(0, 1), (0,), (2,), (0,), (3,)]
    assert speed.schedule(1) == [(0, 1), (2,), (3,)]
    cases = speed.build_cases(speed.FULL_SPECS, speed.Settings())
    goal = {c.id for c in cases if c.tier == 0}
    assert {"vit-b16/vpt-deep fast P=50", "vit-b16/full", "vit-b16/spt-init P=50"} <= goal
    assert all(c.tier in (0, 1, 2, 3) for c in cases)
    assert len({c.id for c in cases}) == len(cases)
    order = speed.rotated(cases, 1)
    assert sorted(c.id for c in order) == sorted(c.id for c in cases)
    assert order[0] != cases[0]


def test_goals_pass_and_fail_on_their_thresholds() -> None:
    b = "vit-b16"

    def summary(fast50: float, full_mem: float) -> dict[str, dict[str, Any]]:
        rows = {
            "vpt-deep fast P=1": {"step_s": 1.0, "img_s": 16.0},
            "vpt-deep fast P=50": {"step_s": fast50, "img_s": 16 / fast50, "train_mb": 500.0},
            "vpt-deep fast P=200": {"step_s": 1.1},
            "vpt-deep reference P=50": {"img_s": 16 / 1.5},
            "full": {"step_s": 2.0, "train_mb": full_mem},
            "frozen-forward": {"seconds": 2.0, "step_mb": 100.0},
            "spt-init P=50": {"seconds": 1.9, "step_mb": 150.0, "buffer_mb": 40.0},
        }
        return {f"{b}/{k}": v for k, v in rows.items()}

    good = {g.name: g.passed for g in speed.evaluate_goals(summary(1.0, 1000.0))}
    assert all(good.values()), good
    bad = {g.name: g.passed for g in speed.evaluate_goals(summary(1.6, 700.0))}
    assert [v for v in bad.values()].count(False) == 3  # vs reference, vs full, memory


@pytest.mark.slow
def test_render_rewrites_the_report_from_raw_numbers(
    quick_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, result = quick_run
    cmd = [sys.executable, "-m", "benchmarks.speed", "--render", str(out / "speed.quick.json")]
    cmd += ["--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "speed.quick.json").read_text())
    assert again["runs"] == result["runs"]
    assert again["summary"] == result["summary"]
    assert [g["verdict"] for g in again["goals"]] == [g["verdict"] for g in result["goals"]]
    assert "re-rendered from the stored raw numbers" in (tmp_path / "speed.quick.md").read_text()
    assert (tmp_path / "speed.quick.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_update_replaces_only_the_selected_cases(
    quick_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, result = quick_run
    stored = tmp_path / "speed.quick.json"
    shutil.copy(out / "speed.quick.json", stored)
    case = "vit-s14/frozen-forward"
    cmd = [sys.executable, "-m", "benchmarks.speed", "--quick", "--update", str(stored)]
    cmd += ["--only", f"^{case}$"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    again = json.loads(stored.read_text())
    new_runs = again["runs"][case]
    assert new_runs and all(r["update"] == 1 for r in new_runs)
    assert new_runs != result["runs"][case]
    for other, runs in result["runs"].items():
        if other != case:
            assert again["runs"][other] == runs, other
    assert again["machine"]["updates"][0]["cases"] == [case]
    assert again["summary"][case]["seconds"] == pytest.approx(
        statistics.median(r["seconds"] for r in new_runs)
    )
    md = (tmp_path / "speed.quick.md").read_text()
    assert f"Update 1: re-measured on {again['machine']['updates'][0]['date']}" in md
    assert f"`{case}`" in md
