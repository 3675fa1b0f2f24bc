"""The accuracy suite's ``--quick`` run: outputs agree, the protocol's choices hold, records are
reused, a changed setting invalidates them, ``--only`` filters, and a killed run resumes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks import accuracy  # the repository root is on pytest's pythonpath

ROOT = Path(__file__).resolve().parents[1]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEM = "accuracy.quick"
ONE_CELL = "digits/vit-tiny/vpt-deep"


def run_quick(results: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.accuracy --quick`` on one thread into ``results``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.accuracy", "--quick", "--threads", "1"]
    cmd += ["--results", str(results), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def record_files(results: Path) -> dict[str, float]:
    """Record file name -> modification time."""
    return {p.name: p.stat().st_mtime_ns for p in (results / STEM / "runs").glob("*.json")}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The suite run once, run again, re-rendered, and run on a copy with a changed setting."""
    base = tmp_path_factory.mktemp("accuracy")
    results = base / "results"
    run_quick(results)
    first = json.loads((results / f"{STEM}.json").read_text())
    files = record_files(results)

    again = run_quick(results)
    second = json.loads((results / f"{STEM}.json").read_text())
    files_after = record_files(results)

    report = run_quick(results, "--report-only")
    rendered = json.loads((results / f"{STEM}.json").read_text())

    changed = base / "changed"
    shutil.copytree(results / STEM, changed / STEM)
    run_quick(changed, "--only", f"^{ONE_CELL}$", "--epochs", "1")
    return {
        "results": results,
        "first": first,
        "files": files,
        "second": second,
        "second_out": again.stdout,
        "files_after": files_after,
        "rendered": rendered,
        "report_out": report.stdout,
        "changed": changed,
        "changed_doc": json.loads((changed / f"{STEM}.json").read_text()),
    }


@pytest.mark.slow
def test_all_outputs_exist_and_agree(quick: dict[str, Any]) -> None:
    results, doc = quick["results"], quick["rendered"]
    for suffix in ("json", "md", "png"):
        assert (results / f"{STEM}.{suffix}").stat().st_size > 0
    assert (results / f"{STEM}.png").read_bytes()[:8] == PNG_MAGIC
    md = (results / f"{STEM}.md").read_text()
    assert doc["status"] == "complete"
    sections = re.split(r"^## ", md, flags=re.MULTILINE)
    for cell in doc["cells"]:
        section = next(s for s in sections if s.startswith(f"{cell['dataset']} (`"))
        line = next(
            ln
            for ln in section.splitlines()
            if ln.startswith(f"| {cell['backbone']} | {cell['method']} |")
        )
        cols = [c.strip() for c in line.strip("|").split("|")]
        mean, std, n = re.fullmatch(r"([\d.]+) ± ([\d.]+) \((\d+)\)", cols[2]).groups()
        assert float(mean) == pytest.approx(100 * cell["test_top1_mean"], abs=0.006)
        assert float(std) == pytest.approx(100 * cell["test_top1_std"], abs=0.006)
        assert int(n) == cell["n_seeds"]
        assert cols[3].startswith(f"**{cell['chosen_lr']:g}** (")
        for g in cell["grid"]:
            assert f"{g['lr']:g}: {100 * g['val_top1']:.1f}" in cols[3]
        assert cols[4] == f"{cell['trainable']:,}"
        assert float(cols[5]) == pytest.approx(cell["trainable_percent"], abs=0.0006)
        # the whole artifact (task.json + task.safetensors), larger than its tensors
        assert float(cols[6].replace(",", "")) == pytest.approx(cell["task_bytes"] / 1024, abs=0.06)
        assert cell["task_bytes"] > cell["task_tensor_bytes"]
        assert float(cols[7]) == pytest.approx(cell["train_seconds_median"], abs=0.6)
        assert float(cols[7]) <= float(cols[8]) + 0.5  # training is part of the run
    for claim in doc["claims"]:
        assert f"**{claim['text']}** ({claim['source']}): **{claim['verdict']}**" in md
    machine = doc["machine"]
    assert machine["cpu_model"] and machine["logical_cores"]
    assert "benchmarks.accuracy --quick" in doc["invocation"]["command"]
    assert f"Command: `{doc['invocation']['command']}`" in md
    assert "ties go to the smaller lr" in md


@pytest.mark.slow
def test_every_cell_has_its_seeds_at_the_chosen_lr(quick: dict[str, Any]) -> None:
    doc = quick["first"]
    setup = accuracy.QUICK
    expected = {c.id for c in accuracy.build_cells(setup)}
    assert {c["id"] for c in doc["cells"]} == expected
    runs = quick["results"] / STEM / "runs"
    records = [json.loads(p.read_text()) for p in runs.glob("*.json")]
    for cell in doc["cells"]:
        assert cell["status"] == "complete", cell["id"]
        assert [s["seed"] for s in cell["seeds"]] == list(range(setup.seeds)), cell["id"]
        assert cell["n_seeds"] == setup.seeds
        mine = [r for r in records if r["cell"] == cell["id"]]
        grid = {r["lr"] for r in mine if r["seed"] == 0}
        assert grid == {g["lr"] for g in cell["grid"]}
        # seeds beyond 0 ran at the chosen lr only; seed 0 at the chosen lr is the grid's run
        assert {r["lr"] for r in mine if r["seed"] > 0} == {cell["chosen_lr"]}
        assert len(mine) == len(cell["grid"]) + setup.seeds - 1
        seed0 = next(r for r in mine if r["seed"] == 0 and r["lr"] == cell["chosen_lr"])
        assert cell["seeds"][0]["test_top1"] == seed0["test_top1"]
        tests = [s["test_top1"] for s in cell["seeds"]]
        assert cell["test_top1_mean"] == pytest.approx(sum(tests) / len(tests))
        # test top-1 is recorded for every run, and the report's grid carries only val scores
        assert all(r["test_top1"] is not None and r["status"] == "ok" for r in mine)
        assert all(set(g) == {"lr", "val_top1", "status"} for g in cell["grid"])


@pytest.mark.slow
def test_chosen_lr_is_the_val_best_ties_to_the_smaller_lr(quick: dict[str, Any]) -> None:
    for cell in quick["first"]["cells"]:
        best = max(g["val_top1"] for g in cell["grid"])
        winners = [g["lr"] for g in cell["grid"] if g["val_top1"] == best]
        assert cell["chosen_lr"] == min(winners), cell["id"]


def test_choose_lr_tie_rule_and_divergence() -> None:
    assert accuracy.choose_lr({0.4: 0.5, 0.1: 0.5, 1.6: 0.3}, 0.0) == 0.1
    assert accuracy.choose_lr({0.4: 0.6, 0.1: 0.5}, 0.0) == 0.4
    assert accuracy.choose_lr({0.4: None, 0.1: 0.2}, 0.0) == 0.1
    assert accuracy.choose_lr({0.4: None}, 0.0) is None


@pytest.mark.slow
def test_second_invocation_trains_nothing(quick: dict[str, Any]) -> None:
    assert quick["files_after"] == quick["files"]  # no record written again
    assert quick["second"]["invocation"]["trained"] == 0
    assert "(0 runs trained)" in quick["second_out"]
    assert quick["second"]["cells"] == quick["first"]["cells"]
    assert quick["rendered"]["cells"] == quick["first"]["cells"]
    assert quick["rendered"]["invocation"]["mode"] == "report only"


@pytest.mark.slow
def test_changed_setting_invalidates_records_and_only_filters(quick: dict[str, Any]) -> None:
    doc, first = quick["changed_doc"], quick["first"]
    inv = doc["invocation"]
    seeds = accuracy.QUICK.seeds
    n_grid = len(next(c for c in first["cells"] if c["id"] == ONE_CELL)["grid"])
    assert inv["trained"] == n_grid + seeds - 1
    assert all(label.startswith(f"{ONE_CELL} ") for label in inv["trained_runs"])
    old = {c["id"]: c for c in first["cells"]}
    for cell in doc["cells"]:
        assert cell["config_hash"] != old[cell["id"]]["config_hash"]  # epochs is in the hash
        expected = "complete" if cell["id"] == ONE_CELL else "pending"
        assert cell["status"] == expected, cell["id"]
    assert doc["records"]["stale"] == len(quick["files"])  # old records kept, not used
    assert doc["setup"]["epochs"] == 1
    md = (quick["changed"] / f"{STEM}.md").read_text()
    assert f"pending (0/{seeds} seeds)" in md


def test_config_hash_ignores_lr_and_seed_only() -> None:
    setup = accuracy.QUICK
    data, bb = setup.datasets[0], setup.backbones[0]
    parts = (data, bb, accuracy.VARIANTS["spt-deep"])
    h = accuracy.config_hash(accuracy.train_values(setup, parts, 0.001, 0))
    assert accuracy.config_hash(accuracy.train_values(setup, parts, 0.004, 1)) == h
    other = accuracy.setup_with_epochs(setup, setup.epochs + 1)
    assert accuracy.config_hash(accuracy.train_values(other, parts, 0.001, 0)) != h
    control = (data, bb, accuracy.VARIANTS["vpt-deep-adamw"])
    vpt = (data, bb, accuracy.VARIANTS["vpt-deep"])
    assert accuracy.config_hash(accuracy.train_values(setup, control, 0.001, 0)) != (
        accuracy.config_hash(accuracy.train_values(setup, vpt, 0.001, 0))
    )


def test_config_hash_skips_options_newer_than_the_suite_at_their_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vprompt.engine.config import TrainConfig
    from vprompt.methods.base import MethodConfig

    setup = accuracy.QUICK
    values = accuracy.train_values(
        setup, (setup.datasets[0], setup.backbones[0], accuracy.VARIANTS["vpt-deep"]), 0.1, 0
    )
    # an engine without `grad_clip` and a VPT without `prompt_dropout` (as when the suite and its
    # records were written) ...
    train_dict, method_dict = TrainConfig.to_dict, MethodConfig.to_dict
    with monkeypatch.context() as m:
        m.setattr(TrainConfig, "to_dict", lambda c: _without(train_dict(c), "grad_clip"))
        m.setattr(MethodConfig, "to_dict", lambda c: _without(method_dict(c), "prompt_dropout"))
        old = accuracy.config_hash(values)
    # ... and an engine that gained them later, which the suite does not know about
    monkeypatch.setattr(
        accuracy, "KNOWN_TRAIN_OPTIONS", accuracy.KNOWN_TRAIN_OPTIONS - {"grad_clip"}
    )
    monkeypatch.setattr(
        accuracy, "KNOWN_METHOD_OPTIONS", accuracy.KNOWN_METHOD_OPTIONS - {"prompt_dropout"}
    )
    assert accuracy.config_hash(values) == old  # at their defaults: the records stay valid
    assert accuracy.config_hash({**values, "grad_clip": 1.0}) != old
    dropout = {**values, "method_options": {**values["method_options"], "prompt_dropout": 0.1}}
    assert accuracy.config_hash(dropout) != old


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def test_claims_verdicts_from_rows() -> None:
    def row(method: str, role: str, mean: float, std: float, status: str = "complete") -> dict:
        return {
            "id": f"d/{role}/{method}",
            "dataset": "d",
            "role": role,
            "method": method,
            "status": status,
            "test_top1_mean": mean,
            "test_top1_std": std,
            "n_seeds": 3,
        }

    rows = [
        row("linear", "vit", 0.80, 0.01),
        row("full", "vit", 0.85, 0.02),
        row("vpt-shallow", "vit", 0.82, 0.01),
        row("vpt-deep", "vit", 0.845, 0.01),
        row("spt-deep", "vit", 0.79, 0.01),
        row("vpt-deep-adamw", "vit", 0.0, 0.0, status="pending"),
        row("linear", "cnn", 0.80, 0.01),
        row("pro-tuning", "cnn", 0.83, 0.01),
    ]
    claims = {c["key"]: c for c in accuracy.evaluate_claims(rows, ["d"])}
    assert claims["prompts-above-linear"]["verdict"] == "mixed"  # spt-deep is below
    assert claims["deep-above-shallow"]["verdict"] == "holds"
    spt = claims["spt-above-random"]
    assert spt["verdict"] == "does not hold" and "not measured yet" in spt["note"]
    assert spt["comparisons"][0]["b"] == "d/vit/vpt-deep"  # the fallback, stated as such
    assert claims["pro-tuning-above-linear-cnn"]["verdict"] == "holds"
    near = claims["prompts-near-full"]
    # vpt-deep is 0.5 points below full (near); vpt-shallow 3 and spt-deep 6 below; no cnn full
    assert [c["holds"] for c in near["comparisons"]] == [False, True, False]
    assert near["verdict"] == "mixed"
    pending = accuracy.evaluate_claims([r for r in rows if r["role"] == "cnn"], ["d"])
    assert {c["key"]: c["verdict"] for c in pending}["deep-above-shallow"] == "not measured yet"

    # a difference within noise is not a 'holds': +0.2 points with stds of 1 point
    noisy = [row("spt-deep", "vit", 0.842, 0.01), row("vpt-deep-adamw", "vit", 0.840, 0.01)]
    spt = {c["key"]: c for c in accuracy.evaluate_claims(noisy, ["d"])}["spt-above-random"]
    assert spt["comparisons"][0]["within_noise"] and spt["verdict"] == "inconclusive (within noise)"
    clear = {**spt["comparisons"][0], "within_noise": False}
    assert accuracy.verdict_of([clear, *spt["comparisons"]]) == "holds, partly within noise"

    # a cell whose every grid lr diverged is a measured failure, not 'not measured yet' forever
    gone = [row("linear", "cnn", 0.80, 0.01), row("pro-tuning", "cnn", 0, 0, status="diverged")]
    cnn = {c["key"]: c for c in accuracy.evaluate_claims(gone, ["d"])}
    assert cnn["pro-tuning-above-linear-cnn"]["verdict"] == "does not hold"
    assert cnn["pro-tuning-above-linear-cnn"]["comparisons"][0]["diverged"] == ["d/cnn/pro-tuning"]


def test_killed_run_resumes_from_its_checkpoint(tmp_path: Path, single_thread: None) -> None:
    from vprompt.engine import TrainingInterrupted, train_run

    setup = accuracy.QUICK
    cell = next(c for c in accuracy.build_cells(setup) if c.id == ONE_CELL)
    lr = cell.lrs[0]

    def job(where: Path) -> accuracy.Job:
        return accuracy.make_job(
            setup, cell, lr, 0, where / "runs", where / "work", 1, "test", "grid"
        )

    reference = accuracy.execute(job(tmp_path / "ref"))
    assert reference["how"] == "fresh" and reference["status"] == "ok"

    cut = job(tmp_path / "cut")
    steps_per_epoch = setup.train_size // setup.batch_size

    def interrupt(state: Any) -> None:
        if state.global_step == steps_per_epoch + 1:  # mid-epoch 2
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train_run(cut.values, cut.run_dir, quiet=True, step_hook=interrupt)
    resumed = accuracy.execute(cut)
    assert resumed["how"] == "resumed" and resumed["status"] == "ok"
    assert len(resumed["val_curve"]) == setup.epochs
    assert resumed["val_top1"] == pytest.approx(reference["val_top1"])
    assert resumed["test_top1"] == pytest.approx(reference["test_top1"])
    assert json.loads(Path(cut.record_path).read_text())["test_top1"] == resumed["test_top1"]
    # a finished run directory whose record was lost is recorded again without training
    Path(cut.record_path).unlink()
    again = accuracy.execute(cut)
    assert again["how"] == "recovered" and again["test_top1"] == resumed["test_top1"]


def test_max_minutes_stops_launching_runs(tmp_path: Path) -> None:
    status = accuracy.main(["--quick", "--results", str(tmp_path), "--max-minutes", "0"])
    assert status == 0
    doc = json.loads((tmp_path / f"{STEM}.json").read_text())
    inv = doc["invocation"]
    assert inv["stopped_by_time"] and inv["trained"] == 0
    assert doc["status"] == "partial"
    assert all(c["status"] == "pending" for c in doc["cells"])
    assert "stopped by --max-minutes" in (tmp_path / f"{STEM}.md").read_text()
    assert {c["key"]: c["verdict"] for c in doc["claims"]} == {
        c.key: "not measured yet" for c in accuracy.CLAIMS
    }
