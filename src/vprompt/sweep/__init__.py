"""The published tuning protocol (lr x wd grid, last-epoch val, retrain on train + val with
seeds, test mean and std), a cheaper successive-halving search, local / process-pool / Ray
backends and resumable Optuna storage; `run_suite` runs many datasets through it.

>>> from vprompt.sweep import SweepSpec, run_sweep
>>> spec = SweepSpec({"backbone": "zoo:dinov2-s", "data": "builtin:digits",
...                   "method": "vpt-deep", "img_size": 112, "epochs": 10},
...                  lrs=(0.1, 0.5), wds=(0.0, 0.001), search="halving", seeds=3)
>>> result = run_sweep(spec, "runs/digits-sweep")
>>> print(result.summary_line())
"""

from vprompt.sweep.backends import Backend, LocalBackend, RayBackend, make_backend
from vprompt.sweep.grids import (
    DEFAULT_GRIDS,
    VPT_LRS,
    VPT_WDS,
    GridDefaults,
    GridPoint,
    choose,
    default_grid,
    parse_values,
)
from vprompt.sweep.protocol import TIE_RULE, SweepResult, run_sweep
from vprompt.sweep.runner import EngineRunner, FinalRun, TrialProgress, TrialRunner
from vprompt.sweep.spec import SweepSpec, halving_cost, rungs
from vprompt.sweep.suite import SuiteResult, load_suite_file, run_suite

__all__ = [
    "DEFAULT_GRIDS",
    "TIE_RULE",
    "VPT_LRS",
    "VPT_WDS",
    "Backend",
    "EngineRunner",
    "FinalRun",
    "GridDefaults",
    "GridPoint",
    "LocalBackend",
    "RayBackend",
    "SuiteResult",
    "SweepResult",
    "SweepSpec",
    "TrialProgress",
    "TrialRunner",
    "choose",
    "default_grid",
    "halving_cost",
    "load_suite_file",
    "make_backend",
    "parse_values",
    "run_suite",
    "run_sweep",
    "rungs",
]
