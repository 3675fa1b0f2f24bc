"""`run_sweep`: the VTAB-1k tuning protocol end to end.

1. Search the lr x wd grid: each trial trains on train and is scored by its last-epoch val
   top-1 (``grid``), or successive halving prunes the weaker trials early (``halving``).
2. Choose the best point (ties: smaller lr, then smaller wd). Nothing has touched test yet.
3. Retrain the chosen point on train + val with several seeds; report test top-1 as mean and
   standard deviation.
4. Write the trial table (Markdown + JSON), a heat-map of the grid and a summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vprompt._paths import make_dir
from vprompt.errors import ConfigError
from vprompt.sweep.backends import Backend, LocalBackend
from vprompt.sweep.grids import GridPoint, choose
from vprompt.sweep.report import finite_or_none, pct_spread
from vprompt.sweep.runner import EngineRunner, FinalRun, TrialRunner
from vprompt.sweep.search import Searcher
from vprompt.sweep.spec import SweepSpec, check_validation_epochs
from vprompt.sweep.study import (
    SweepStudy,
    TrialView,
    default_storage,
    driver_mark,
    live_other_driver,
)

TIE_RULE = "highest last-epoch val top-1; ties go to the smaller lr, then the smaller wd"


@dataclass(frozen=True)
class FinalItem:
    """A unit of final work: one seed on train + val."""

    seed: int
    values: dict[str, Any]
    run_dir: str


@dataclass
class FinalJob:
    """Picklable callable that runs a `FinalItem` with a runner."""

    runner: TrialRunner

    def __call__(self, item: FinalItem) -> FinalRun:
        return self.runner.final(item.values, Path(item.run_dir))


@dataclass
class SweepResult:
    """The outcome of a sweep.

    Attributes:
        spec: the sweep.
        out: its output directory.
        epochs: epochs of a full trial.
        trials: every grid point's trial, lr-major.
        choice: the chosen point; ``choice_val`` its last-epoch val top-1.
        finals: the final runs, by seed.
        storage: the Optuna storage URL; ``study`` the study name.
        seconds: wall time of this invocation.
    """

    spec: SweepSpec
    out: Path
    epochs: int
    trials: list[TrialView]
    choice: GridPoint | None  # None only in the trial reports of a sweep with nothing to choose
    choice_val: float
    finals: list[FinalRun]
    storage: str
    study: str
    seconds: float = 0.0

    @property
    def test(self) -> list[float]:
        return [f.test_top1 for f in self.finals]

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test) if self.finals else math.nan

    @property
    def test_std(self) -> float:
        """Sample standard deviation over seeds (NaN for fewer than two: no spread measured)."""
        return statistics.stdev(self.test) if len(self.finals) > 1 else math.nan

    @property
    def trial_epochs(self) -> int:
        """Epochs of training the search spent (sum over trials of the epochs each completed)."""
        return sum(t.epochs for t in self.trials)

    @property
    def grid_trial_epochs(self) -> int:
        """What training every point for every epoch costs."""
        return len(self.trials) * self.epochs

    def summary_line(self) -> str:
        """One line: choice, val, test mean +- std, compute, output directory."""
        v = self.spec.values
        spent = f"{self.trial_epochs}/{self.grid_trial_epochs} trial-epochs"
        frac = self.trial_epochs / max(self.grid_trial_epochs, 1)
        test = (
            f"test {pct_spread(self.test_mean, self.test_std, len(self.finals))}% over "
            f"{len(self.finals)} seed(s)"
            if self.finals
            else "no final runs (--seeds 0)"
        )
        return (
            f"sweep {v.get('method')} on {v.get('data')} ({self.spec.search}, "
            f"{len(self.trials)} points): chose {self.choice.label()} "
            f"(val {100 * self.choice_val:.2f}%); {test}; search {spent} "
            f"({100 * frac:.0f}% of the grid) -> {self.out}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (``summary.json``)."""
        v = self.spec.values
        return {
            "method": v.get("method"),
            "backbone": v.get("backbone"),
            "data": v.get("data"),
            "data_seed": int(v.get("data_seed") or 0),
            "search": self.spec.search,
            "halving": {"eta": self.spec.eta, "min_epochs": self.spec.min_epochs}
            if self.spec.search == "halving"
            else None,
            "grid": {
                "lr": list(self.spec.lrs or ()),
                "wd": list(self.spec.wds or ()),
                "source": self.spec.grid_source,
            },
            "epochs": self.epochs,
            "rule": TIE_RULE,
            "choice": {
                "lr": self.choice.lr,
                "wd": self.choice.wd,
                "val_top1": finite_or_none(self.choice_val),
            },
            "test": {
                "mean": finite_or_none(self.test_mean),
                "std": finite_or_none(self.test_std),
                "std_kind": "sample (n-1)",
                "per_seed": [
                    {
                        "seed": f.seed,
                        "top1": finite_or_none(f.test_top1),
                        "run_dir": f.run_dir,
                        "task_dir": f.task_dir,
                    }
                    for f in self.finals
                ],
            },
            "compute": {
                "trial_epochs": self.trial_epochs,
                "grid_trial_epochs": self.grid_trial_epochs,
                "fraction": self.trial_epochs / max(self.grid_trial_epochs, 1),
            },
            "storage": self.storage,
            "study": self.study,
            "training": v,
            "seconds": self.seconds,
        }


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    backend: Backend | None = None,
    runner: TrialRunner | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run the tuning protocol and write its outputs into ``out``.

    Args:
        spec: what to train and search.
        out: output directory (created; a second run with the same spec resumes).
        backend: where trials run (this process when None).
        runner: trains trials and final runs (`EngineRunner` when None).
        storage: SQLAlchemy URL of the Optuna storage (``sqlite:///OUT/sweep.db`` when None).
        study_name: the study (derived from the spec when None).
        log: receives progress lines (silent when None).

    Returns:
        The `SweepResult`; also in ``out/summary.json``.
    """
    from vprompt.engine import resolve_config
    from vprompt.sweep.report import write_reports, write_search_reports

    start = time.perf_counter()
    check_sweep_out(Path(out).expanduser())
    out = make_dir(out, "--out")
    log = log or (lambda _msg: None)
    backend = backend or LocalBackend()
    runner = runner or EngineRunner()
    resolved = resolve_config(spec.search_values(spec.points[0])).to_dict()
    epochs = int(resolved["epochs"])
    check_validation_epochs(spec, epochs, int(resolved.get("eval_every") or 1))
    storage = storage or default_storage(out)
    name = study_name or spec.study_name(resolved)
    with claim_out(out):
        study = SweepStudy(storage, name, spec.key_doc(resolved))
        try:
            views = Searcher(spec, study, epochs, out, backend, runner, log).run()
            try:
                choice, val = choose_point(views)
            except ConfigError:  # nothing to choose: still show which trial failed, and when
                partial = SweepResult(
                    spec, out, epochs, [views[p] for p in spec.points if p in views],
                    None, math.nan, [], storage, name, time.perf_counter() - start,
                )  # fmt: skip
                write_search_reports(partial)
                raise
            log(
                f"chose {choice.label()} (val {100 * val:.2f}%)"
                + (
                    f"; final runs on train + val with seeds {spec.final_seeds}"
                    if spec.seeds
                    else ""
                )
            )
            finals = run_finals(spec, choice, out, backend, runner, log)
        finally:
            study.release()
    result = SweepResult(
        spec,
        out,
        epochs,
        [views[p] for p in spec.points],
        choice,
        val,
        finals,
        storage,
        name,
        time.perf_counter() - start,
    )
    write_reports(result)
    return result


DRIVER_FILE = ".sweep-driver.json"
SWEEP_MARKERS = ("sweep.db", "trials", "final", "trials.json", DRIVER_FILE)
"""What a sweep writes into its ``--out`` (any one marks the folder as a sweep's)."""


def check_sweep_out(out: Path) -> None:
    """Refuse an ``--out`` that holds files but is not a sweep's: the sweep would write its
    summary over a training run's ``summary.json``, its database into a dataset folder."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if any((out / marker).exists() for marker in SWEEP_MARKERS):
        return
    what = "a training run" if (out / "config.yaml").is_file() else "other files"
    raise ConfigError(
        f"--out {out} holds {what}, not a sweep (no {', '.join(SWEEP_MARKERS[:3])}); give a "
        "new or empty folder, or the --out of a sweep to continue it"
    )


@contextlib.contextmanager
def claim_out(out: Path) -> Iterator[None]:
    """One sweep at a time per ``--out`` (on this host): sweeps with other options keep their
    own studies and trial checkpoints, but their final runs share ``OUT/final``.

    Raises:
        ConfigError: another live sweep process holds ``out``.
    """
    path = out / DRIVER_FILE
    try:
        other = live_other_driver(json.loads(path.read_text()))
    except (OSError, ValueError):
        other = None
    if other is not None:
        raise ConfigError(
            f"another vprompt sweep (pid {other}) is writing into {out}; wait for it, "
            "stop it, or give this sweep another --out"
        )
    path.write_text(json.dumps(driver_mark()))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def choose_point(views: dict[GridPoint, TrialView]) -> tuple[GridPoint, float]:
    """The chosen point among complete trials and its last-epoch val top-1."""
    scores = {p: v.last_val for p, v in views.items() if v.outcome == "complete"}
    try:
        point = choose(scores)
    except ConfigError as e:
        pruned = [v for v in views.values() if v.outcome == "pruned" and math.isfinite(v.last_val)]
        hint = (
            f"; successive halving had pruned {len(pruned)} healthy trial(s) before the last "
            "survivors diverged: --search grid trains every point to the end"
            if pruned
            else ""
        )
        raise ConfigError(
            f"{e}{hint}; trials.md and grid.png in the output folder show each trial's outcome"
        ) from None
    return point, scores[point]


def run_finals(
    spec: SweepSpec,
    choice: GridPoint,
    out: Path,
    backend: Backend,
    runner: TrialRunner,
    log: Callable[[str], None],
) -> list[FinalRun]:
    """Train the chosen point on train + val with every final seed."""
    items = [
        FinalItem(s, spec.final_values(choice, s), str(out / "final" / f"seed-{s}"))
        for s in spec.final_seeds
    ]
    results: dict[int, FinalRun] = {}
    for item in items:
        run_dir = Path(item.run_dir)
        if (run_dir / "config.yaml").is_file():
            from vprompt.engine import resolve_config
            from vprompt.sweep.runner import same_run

            if not same_run(run_dir, resolve_config(item.values).to_dict()):
                log(
                    f"final seed {item.seed}: {run_dir} holds a final run with other options "
                    "(an earlier sweep into this --out); it is replaced"
                )

    def got(item: FinalItem, run: FinalRun) -> None:
        results[item.seed] = run
        log(f"final seed {item.seed}: test {100 * run.test_top1:.2f}% -> {run.run_dir}")

    backend.map(FinalJob(runner), items, got)
    return [results[s] for s in spec.final_seeds]
