"""The run directory: what a training run leaves for people and scripts.

::

    RUN_DIR/
      config.yaml       every option, resolved (method options, specs, actual lr, steps)
      metrics.jsonl     one JSON object per epoch
      steps.jsonl       one JSON object per optimizer step (step, epoch, loss, lr)
      curves.png        loss and accuracy against the epoch
      summary.json      final val/test metrics, parameter report, task size, time
      checkpoint.pt     resumable state (torch.load(weights_only=True))
      checkpoint.json   where that checkpoint stands, in plain text
      task/             the task artifact (task.json + task.safetensors)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from vprompt._atomic import atomic_write, atomic_write_text
from vprompt._paths import check_dir_target, make_dir
from vprompt.engine.checkpoint import CHECKPOINT, CHECKPOINT_INFO, save_checkpoint
from vprompt.errors import ConfigError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
CURVES = "curves.png"
SUMMARY = "summary.json"
TASK = "task"
RUN_MARKERS = (CONFIG, METRICS, CHECKPOINT, SUMMARY)
RUN_ENTRIES = frozenset(
    (CONFIG, METRICS, STEPS, CURVES, SUMMARY, CHECKPOINT, CHECKPOINT_INFO, TASK)
)
"""Everything a run writes at its top level (plus ``eval-SPLIT/`` folders from `vprompt eval`
and the hidden temporary files of interrupted atomic writes)."""


def is_run_dir(path: Path) -> bool:
    """True if ``path`` holds any file a training run writes."""
    return any((path / m).exists() for m in RUN_MARKERS)


def foreign_entries(path: Path) -> list[str]:
    """Names in ``path`` that no run writes (so `--overwrite` must not delete them)."""
    return sorted(
        e.name
        for e in path.iterdir()
        if e.name not in RUN_ENTRIES
        and not (e.is_dir() and e.name.startswith("eval-"))
        and not (e.name.startswith(".") and e.name.endswith(".tmp"))
    )


class RunDir:
    """Writes the files of one run (rank 0 only)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()  # as `make_dir`: --out '~/runs/x' past the shell

    # ------------------------------------------------------------------ lifecycle
    def check_target(self, overwrite: bool = False) -> None:
        """Check that a fresh run may be written here, without touching anything.

        Raises:
            ConfigError: the path is a file; the directory is not empty (without
                ``overwrite``); or it is not a run directory, or holds anything a run does not
                write (``overwrite`` replaces run directories only, and only whole).
        """
        p = self.path
        check_dir_target(p, "--out")
        if not (p.is_dir() and any(p.iterdir())):
            return
        if not overwrite:
            resumable = (p / CHECKPOINT).is_file()
            raise ConfigError(
                f"run directory {p} already exists and is not empty; pass --overwrite to "
                + (
                    f"replace it, or `vprompt train --resume {p}` to continue it"
                    if resumable
                    else "replace it (it has no checkpoint to resume: a run there stopped "
                    "before its first one, or it is not a run)"
                )
            )
        if not is_run_dir(p):
            raise ConfigError(
                f"{p} is not empty and is not a vprompt run directory (no {CONFIG}); "
                "--overwrite only replaces run directories, so choose another --out"
            )
        foreign = foreign_entries(p)
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            )
            raise ConfigError(
                f"{p} holds files a run does not write ({shown}); --overwrite would delete "
                "them, so it refuses: move them out or choose another --out"
            )

    def create(self, overwrite: bool = False) -> None:
        """Make a fresh run directory (replacing a run directory with ``overwrite``); see
        `check_target` for what is refused."""
        self.check_target(overwrite)
        if self.path.is_dir() and any(self.path.iterdir()):
            shutil.rmtree(self.path)
        make_dir(self.path, "--out")

    def write_config(self, text: str) -> None:
        atomic_write_text(self.path / CONFIG, text)

    # ------------------------------------------------------------------ RunSink
    def step(self, record: dict[str, Any]) -> None:
        with open(self.path / STEPS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def epoch(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        plot_curves(history, self.path / CURVES)

    def checkpoint(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.path, state)

    # ------------------------------------------------------------------ resume / end
    def rewind(self, global_step: int, history: list[dict[str, Any]]) -> None:
        """Drop records written after the checkpoint a resumed run continues from (and draw
        the curves of the epochs it keeps: a kill can come between a checkpoint and its plot)."""
        atomic_write_text(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in history))
        if history:
            plot_curves(history, self.path / CURVES)
        steps = self.path / STEPS
        if steps.exists():
            kept = [
                line
                for line in steps.read_text().splitlines()
                if (record := _record(line)) is not None and record["step"] <= global_step
            ]
            atomic_write_text(steps, "".join(line + "\n" for line in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")

    @property
    def task_dir(self) -> Path:
        return self.path / TASK


def _record(line: str) -> dict[str, Any] | None:
    """A step record, or None for a blank line or one a killed process left half written."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a ``.jsonl`` file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss, and train/val top-1, against the epoch (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    _plot(ax_loss, history, "train_loss", "train loss")
    _plot(ax_loss, history, "val_loss", "val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    _plot(ax_acc, history, "train_top1", "train top-1")
    _plot(ax_acc, history, "val_top1", "val top-1")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    finally:
        plt.close(fig)


def _plot(ax: Any, history: list[dict[str, Any]], key: str, label: str) -> None:
    """One curve, skipping epochs without the value (validation every N epochs)."""
    points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=label)
