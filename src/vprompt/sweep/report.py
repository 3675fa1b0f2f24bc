"""Sweep outputs: the trial table (Markdown + JSON), the grid heat-map (PNG) and the summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vprompt.sweep.protocol import SweepResult
    from vprompt.sweep.study import TrialView

TRIALS_MD, TRIALS_JSON = "trials.md", "trials.json"
HEATMAP = "grid.png"
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"


def pct(x: float | None) -> str:
    """``91.50`` for 0.915; ``-`` for a missing value."""
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def pct_spread(mean: float, std: float, seeds: int) -> str:
    """``84.40 ± 0.10`` over several seeds; ``84.40`` over one (no spread was measured, and
    ``± 0.00`` would read as a stable result); ``-`` over none."""
    if seeds == 0:
        return "-"
    return pct(mean) if seeds == 1 else f"{pct(mean)} ± {pct(std)}"


def finite_or_none(x: float) -> float | None:
    """A number for JSON: NaN (no value) becomes null, which every JSON reader accepts."""
    return x if math.isfinite(x) else None


def trial_rows(result: SweepResult) -> list[dict[str, Any]]:
    """One JSON-able row per grid point."""
    rows = []
    for t in result.trials:
        rows.append(
            {
                "trial": t.number,
                "lr": t.point.lr,
                "wd": t.point.wd,
                "epochs": t.epochs,
                "val_top1": None if not math.isfinite(t.last_val) else t.last_val,
                "val_per_epoch": [None if not math.isfinite(v) else v for v in t.val],
                "outcome": t.outcome,
                "message": t.message,
                "chosen": t.point == result.choice,
            }
        )
    return rows


def _status(t: TrialView, epochs: int) -> str:
    if t.outcome == "complete":
        return "complete"
    if t.outcome == "diverged":  # during the epoch after its last recorded one
        return f"diverged in epoch {t.epochs + 1}" if t.epochs < epochs else "diverged"
    return f"{t.outcome} at epoch {t.epochs}" if t.epochs < epochs else t.outcome


def trials_markdown(result: SweepResult) -> str:
    """The trial table: every point, its val top-1 at its last epoch and its status."""
    lines = [
        f"# Sweep: {result.spec.values.get('method')} on {result.spec.values.get('data')}",
        "",
        f"Search `{result.spec.search}` over {len(result.trials)} points, {result.epochs} epochs "
        f"per full trial; score: last-epoch val top-1 (ties: smaller lr, then smaller wd).",
        "",
        "| trial | lr | wd | epochs | val top-1 (%) | status | chosen |",
        "|---:|---:|---:|---:|---:|---|:---:|",
    ]
    for t in result.trials:
        mark = "**yes**" if t.point == result.choice else ""
        lines.append(
            f"| {t.number} | {t.point.lr:g} | {t.point.wd:g} | {t.epochs} | "
            f"{pct(t.last_val)} | {_status(t, result.epochs)} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def summary_markdown(result: SweepResult) -> str:
    """The summary: choice, test mean +- std per seed, compute."""
    d = result.to_dict()
    lines = [
        f"# Sweep summary: {d['method']} on {d['data']}",
        "",
        f"- backbone: `{d['backbone']}`; search: `{d['search']}`; grid source: "
        f"{d['grid']['source']}",
        f"- chosen: lr {result.choice.lr:g}, wd {result.choice.wd:g} "
        f"(val top-1 {pct(result.choice_val)}%; rule: {d['rule']})",
        (
            f"- test top-1 on train + val retraining: "
            f"**{pct_spread(result.test_mean, result.test_std, len(result.finals))}%** over "
            f"{len(result.finals)} seed(s) (sample std), all on the images of data seed "
            f"{d['data_seed']}"
            if result.finals
            else "- test top-1: no final runs (--seeds 0)"
        ),
        f"- compute: {result.trial_epochs} trial-epochs of {result.grid_trial_epochs} for the "
        f"full grid ({100 * d['compute']['fraction']:.1f}%)",
        f"- storage: `{result.storage}`, study `{result.study}`",
        "",
        "| seed | test top-1 (%) | run |",
        "|---:|---:|---|",
    ]
    lines += [f"| {f.seed} | {pct(f.test_top1)} | `{f.run_dir}` |" for f in result.finals]
    return "\n".join(lines) + "\n"


def plot_heatmap(result: SweepResult, path: Path) -> None:
    """lr x wd heat-map of val top-1 at each trial's last epoch; pruned cells are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lrs, wds = sorted(result.spec.lrs or ()), sorted(result.spec.wds or ())
    grid = np.full((len(lrs), len(wds)), np.nan)
    by_point = {(t.point.lr, t.point.wd): t for t in result.trials}
    for i, lr in enumerate(lrs):
        for j, wd in enumerate(wds):
            t = by_point.get((lr, wd))
            if t is not None and math.isfinite(t.last_val):
                grid[i, j] = 100 * t.last_val
    fig, ax = plt.subplots(figsize=(1.4 * len(wds) + 2.5, 0.55 * len(lrs) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    fig.colorbar(im, ax=ax, label="val top-1 (%) at the trial's last epoch")
    ax.set_xticks(range(len(wds)), [f"{w:g}" for w in wds])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_xlabel("weight decay")
    ax.set_ylabel("base learning rate")
    for i, lr in enumerate(lrs):
        for j, wd in enumerate(wds):
            dark = not np.isfinite(grid[i, j]) or im.norm(grid[i, j]) < 0.6
            _annotate(ax, i, j, by_point.get((lr, wd)), result, "white" if dark else "black")
    ax.set_title(
        f"{result.spec.values.get('method')} on {result.spec.values.get('data')} "
        f"({result.spec.search})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _annotate(
    ax: Any, i: int, j: int, t: TrialView | None, result: SweepResult, color: str
) -> None:
    from matplotlib.patches import Rectangle

    if t is None:
        return
    when = t.epochs + 1 if t.outcome == "diverged" else t.epochs  # diverged during the next
    text = (
        pct(t.last_val) if t.outcome == "complete" else f"{pct(t.last_val)}\n{t.outcome[:5]}@{when}"
    )
    ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    if t.outcome != "complete":
        ax.add_patch(
            Rectangle(
                (j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="grey", linewidth=0
            )
        )
    if t.point == result.choice:
        ax.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5)
        )


def write_reports(result: SweepResult) -> None:
    """Write every output file into ``result.out``."""
    write_search_reports(result)
    out = result.out
    (out / SUMMARY_JSON).write_text(
        json.dumps(result.to_dict(), indent=2, default=str, allow_nan=False) + "\n"
    )
    (out / SUMMARY_MD).write_text(summary_markdown(result))


def write_search_reports(result: SweepResult) -> None:
    """The trial table and the heat-map alone (``result.choice`` may be None: nothing chosen,
    when every trial diverged, and these show where and when)."""
    out = result.out
    (out / TRIALS_MD).write_text(trials_markdown(result))
    (out / TRIALS_JSON).write_text(json.dumps(trial_rows(result), indent=2) + "\n")
    plot_heatmap(result, out / HEATMAP)
