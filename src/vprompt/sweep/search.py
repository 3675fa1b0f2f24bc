"""The search over the grid: every point for all epochs, or synchronous successive halving.

Both read the study first and train only what it does not hold yet, so a restarted sweep picks
up where it stopped. Halving's decisions are re-derived from the recorded validation scores at
every rung, so a resumed search makes exactly the decisions an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vprompt.errors import TrainingError
from vprompt.sweep.backends import Backend
from vprompt.sweep.grids import GridPoint, ranked
from vprompt.sweep.runner import TrialProgress, TrialRunner, remove_checkpoint
from vprompt.sweep.spec import SweepSpec, rungs, survivors
from vprompt.sweep.study import SweepStudy, TrialView


@dataclass(frozen=True)
class AdvanceItem:
    """A unit of search work: train trial ``number`` up to epoch ``target``."""

    number: int
    point: GridPoint
    values: dict[str, Any]
    target: int
    trial_dir: str


@dataclass
class AdvanceJob:
    """Picklable callable that runs an `AdvanceItem` with a runner (in any process)."""

    runner: TrialRunner

    def __call__(self, item: AdvanceItem) -> TrialProgress:
        return self.runner.advance(item.values, item.target, Path(item.trial_dir))


def trial_dir(out: Path, study: str, view: TrialView) -> Path:
    """``OUT/trials/STUDY/NNN-lrX-wdY``: the trial's checkpoint while it is paused or running
    (per study: sweeps with other options in the same ``--out`` never share one)."""
    name = f"{view.number:03d}-lr{view.point.lr:g}-wd{view.point.wd:g}"
    return out / "trials" / study / name


class _Pace:
    """``[3/8, eta 4m10s] `` prefixes for the result lines of one batch of units."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def tick(self) -> str:
        self.done += 1
        left = self.total - self.done
        if left == 0:
            return f"[{self.done}/{self.total}] "
        eta = (time.perf_counter() - self.start) / self.done * left
        return f"[{self.done}/{self.total}, eta {_duration(eta)}] "


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Searcher:
    """Runs the search of one sweep and records it in its study."""

    spec: SweepSpec
    study: SweepStudy
    epochs: int
    out: Path
    backend: Backend
    runner: TrialRunner
    log: Callable[[str], None]
    _pace: _Pace | None = None

    def run(self) -> dict[GridPoint, TrialView]:
        """Search until every point is finished; return every point's trial."""
        points = self.spec.points
        self.study.ensure_trials(points)
        self.log(
            f"search ({self.spec.search}): {len(points)} trial(s) of up to {self.epochs} "
            f"epoch(s), study {self.study.name}; a line per finished unit, with an ETA"
        )
        done = sum(v.finished for v in self.views().values())
        if done:
            self.log(f"resuming: {done} of {len(points)} trials already finished")
        if self.spec.search == "grid":
            self.advance(list(self.views().values()), self.epochs)
        else:
            self.halving()
        return self.views()

    def views(self) -> dict[GridPoint, TrialView]:
        return self.study.views(self.spec.points)

    # ------------------------------------------------------------------ halving
    def halving(self) -> None:
        """Synchronous successive halving; decisions at rung r use val top-1 at epoch r."""
        plan = rungs(self.epochs, self.spec.min_epochs, self.spec.eta)
        entrants = list(self.spec.points)
        for i, r in enumerate(plan):
            views = self.views()
            self.log(f"rung {i + 1}/{len(plan)}: {len(entrants)} trial(s) to epoch {r}")
            self.advance([views[p] for p in entrants], r)
            if r == self.epochs:
                return
            entrants = self.decide(entrants, r)

    def decide(self, entrants: list[GridPoint], r: int) -> list[GridPoint]:
        """Keep the best ``ceil(n / eta)`` of the entrants by val at epoch ``r``; prune the rest."""
        views = self.views()
        scores = {p: views[p].val[r - 1] if views[p].epochs >= r else math.nan for p in entrants}
        keep = ranked(scores)[: survivors(len(entrants), self.spec.eta)]
        for p in entrants:
            if p not in keep and not views[p].finished:
                self.study.prune(
                    views[p].number, f"not in the best {len(keep)} of {len(entrants)} at epoch {r}"
                )
                remove_checkpoint(trial_dir(self.out, self.study.name, views[p]))
        self.log(f"  kept {', '.join(p.label() for p in keep) or 'none'}")
        return keep

    # ------------------------------------------------------------------ training
    def advance(self, views: list[TrialView], target: int) -> None:
        """Train the unfinished trials among ``views`` up to epoch ``target``."""
        todo = [v for v in views if not v.finished]
        for v in todo:
            if v.epochs >= target:
                self.settle(v.number, v.point, target)
        items = [
            AdvanceItem(
                v.number,
                v.point,
                self.spec.search_values(v.point),
                target,
                str(trial_dir(self.out, self.study.name, v)),
            )
            for v in sorted(todo, key=lambda v: v.number)
            if v.epochs < target
        ]
        self._pace = _Pace(len(items))
        self.backend.map(AdvanceJob(self.runner), items, self.on_progress)

    def on_progress(self, item: AdvanceItem, progress: TrialProgress) -> None:
        """Record a unit's epochs in the study; finish the trial if it is done."""
        self.study.record(item.number, progress)
        pace = self._pace.tick() if self._pace is not None else ""
        if progress.diverged:
            self.study.prune(
                item.number,
                f"diverged after epoch {progress.epochs}: {progress.diverged}",
                outcome="diverged",
            )
            remove_checkpoint(Path(item.trial_dir))
            self.log(
                f"{pace}trial {item.number} {item.point.label()}: diverged after "
                f"{progress.epochs} epoch(s)"
            )
            return
        if progress.epochs < item.target:
            raise TrainingError(
                f"trial {item.number} stopped at epoch {progress.epochs} of {item.target} "
                "without an error; this is a bug in the trial runner"
            )
        self.settle(item.number, item.point, item.target)
        self.log(
            f"{pace}trial {item.number} {item.point.label()}: epoch {progress.epochs}/"
            f"{self.epochs} val {100 * progress.val[item.target - 1]:.2f}% "
            f"({progress.seconds:.1f}s)"
        )

    def settle(self, number: int, point: GridPoint, target: int) -> None:
        """Mark a trial that reached all epochs complete and drop its checkpoint."""
        if target < self.epochs:
            return
        self.study.complete(number)
        view = self.views()[point]
        remove_checkpoint(trial_dir(self.out, self.study.name, view))
