"""`SweepSpec`: what a sweep trains, which grid it searches, how, and how many final seeds.

The spec also names the sweep: its study name in the Optuna storage is a hash of everything that
changes results, so the same command on another day (or machine) finds its finished trials.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from vprompt.engine.config import ADDED_OPTIONS, NO_EFFECT
from vprompt.errors import ConfigError
from vprompt.sweep.grids import GridPoint, default_grid, grid_points, parse_values

Search = Literal["grid", "halving"]
SEARCHES: tuple[str, ...] = ("grid", "halving")

NOT_IN_KEY: frozenset[str] = NO_EFFECT | {
    "lr",
    "wd",
    "merge_train_val",
    "select",
    "evaluate_test",
}
"""Training options left out of the study key: they do not change results, are searched, or are
set by the protocol. (``seed`` and ``data_seed`` change results, so they are in the key.)"""

PROTOCOL_OPTIONS: frozenset[str] = frozenset({"merge_train_val", "select", "evaluate_test"})
"""Options the protocol sets itself: search on train / val without test, retrain on train + val
and test, last epoch."""


@dataclass
class SweepSpec:
    """A sweep.

    Attributes:
        values: training options as for `vprompt.engine.train_run` (``lr`` / ``wd`` are searched;
            ``seed`` is the search seed and the first final seed; ``data_seed`` picks the images
            of every run, search and final alike).
        lrs: base learning rates to search (the method's default grid when None).
        wds: weight decays to search (the method's default grid when None).
        search: ``grid`` trains every point for all epochs; ``halving`` is synchronous successive
            halving: every point trains ``min_epochs``, the best ``ceil(n / eta)`` continue to
            ``min_epochs x eta`` epochs, and so on up to the full epochs.
        eta: halving's reduction factor (>= 2).
        min_epochs: halving's first rung, in epochs.
        seeds: final runs on train + val, seeds ``seed``, ``seed + 1``, ... (0: search only);
            they all train and test on the same images (one ``data_seed``).
    """

    values: dict[str, Any]
    lrs: tuple[float, ...] | None = None
    wds: tuple[float, ...] | None = None
    search: Search = "grid"
    eta: int = 3
    min_epochs: int = 1
    seeds: int = 5
    grid_source: str = field(default="", init=False)

    def __post_init__(self) -> None:
        # paths that work from any directory: Ray runs trials in working folders of its own
        from vprompt.backbones.spec import absolute_file_spec
        from vprompt.data.specs import absolute_data_spec

        self.values = dict(self.values)
        if isinstance(self.values.get("data"), str):
            self.values["data"] = absolute_data_spec(self.values["data"])
        if isinstance(self.values.get("backbone"), str):
            self.values["backbone"] = absolute_file_spec(self.values["backbone"])
        if self.search not in SEARCHES:
            raise ConfigError(f"--search {self.search!r} is not one of {list(SEARCHES)}")
        if self.eta < 2:
            raise ConfigError(f"--eta must be at least 2, got {self.eta}")
        if self.min_epochs < 1:
            raise ConfigError(f"--min-epochs must be at least 1, got {self.min_epochs}")
        if self.seeds < 0:
            raise ConfigError(f"--seeds must be >= 0 (0: search only), got {self.seeds}")
        clash = sorted(k for k in PROTOCOL_OPTIONS if k in self.values)
        if clash:
            raise ConfigError(
                f"a sweep sets {clash} itself (search on train/val scored by the last epoch, "
                "never touching test; final runs on train + val, tested); drop them"
            )
        defaults = default_grid(str(self.values.get("method", "")))
        self.lrs = parse_values(self.lrs, "lr") or defaults.lrs
        self.wds = parse_values(self.wds, "wd") or defaults.wds
        same = (sorted(self.lrs), sorted(self.wds)) == (sorted(defaults.lrs), sorted(defaults.wds))
        self.grid_source = defaults.source if same else "user grid"

    @property
    def points(self) -> list[GridPoint]:
        """The grid, lr-major ascending."""
        assert self.lrs is not None and self.wds is not None
        return grid_points(self.lrs, self.wds)

    @property
    def seed(self) -> int:
        """The search seed (also the first final seed)."""
        return int(self.values.get("seed", 0) or 0)

    @property
    def final_seeds(self) -> list[int]:
        """Seeds of the final runs."""
        return [self.seed + i for i in range(self.seeds)]

    def search_values(self, point: GridPoint) -> dict[str, Any]:
        """Options of a search trial: train on train, score on val, never build test."""
        return {
            **self.values,
            "lr": point.lr,
            "wd": point.wd,
            "merge_train_val": False,
            "evaluate_test": False,
        }

    def final_values(self, point: GridPoint, seed: int) -> dict[str, Any]:
        """Options of a final run: train on train + val, report test. Only ``seed`` varies
        between final runs; ``data_seed`` keeps them on the search's images."""
        return {
            **self.values,
            "lr": point.lr,
            "wd": point.wd,
            "seed": seed,
            "merge_train_val": True,
            "evaluate_test": True,
        }

    def key_doc(self, resolved: dict[str, Any]) -> dict[str, Any]:
        """Everything that changes the search's results (the grid only where decisions use it).

        Args:
            resolved: a search trial's resolved training options (``TrainConfig.to_dict()``),
                so a default and the same value given explicitly name the same study.
        """
        train = {
            k: v
            for k, v in sorted(resolved.items())
            if k not in NOT_IN_KEY and not (k in ADDED_OPTIONS and v == ADDED_OPTIONS[k])
        }
        doc: dict[str, Any] = {"train": train, "search": self.search}
        if self.search == "halving":
            # the grid as a set: the same values typed in another order are the same study
            lrs, wds = sorted(self.lrs or ()), sorted(self.wds or ())
            doc.update(eta=self.eta, min_epochs=self.min_epochs, lrs=lrs, wds=wds)
        return doc

    def study_name(self, resolved: dict[str, Any]) -> str:
        """Default study name: ``vprompt-<method>-<hash of key_doc>``."""
        text = json.dumps(self.key_doc(resolved), sort_keys=True, default=str)
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        return f"vprompt-{self.values.get('method', 'sweep')}-{digest}"


def check_validation_epochs(spec: SweepSpec, epochs: int, eval_every: int) -> None:
    """Halving compares trials at its rungs: each rung must be an epoch that validates.

    Raises:
        ConfigError: ``--eval-every`` skips validation at a rung.
    """
    if spec.search != "halving" or eval_every <= 1:
        return
    plan = rungs(epochs, spec.min_epochs, spec.eta)
    skipped = [r for r in plan[:-1] if r % eval_every]
    if skipped:
        raise ConfigError(
            f"halving compares trials at epochs {plan}, but --eval-every {eval_every} does not "
            f"validate at {skipped}; drop --eval-every or pick --min-epochs / --eta so that every "
            "rung is a multiple of it"
        )


def rungs(epochs: int, min_epochs: int, eta: int) -> list[int]:
    """Epochs at which successive halving compares trials: min, min x eta, ... then ``epochs``.

    >>> rungs(8, 1, 3)
    [1, 3, 8]
    """
    out: list[int] = []
    r = min_epochs
    while r < epochs:
        out.append(r)
        r *= eta
    out.append(epochs)
    return out


def survivors(n: int, eta: int) -> int:
    """How many of ``n`` trials continue past a rung: ``ceil(n / eta)``."""
    return max(1, math.ceil(n / eta))


def halving_cost(n: int, epochs: int, min_epochs: int, eta: int) -> int:
    """Trial-epochs successive halving spends on ``n`` points when no trial diverges."""
    total, prev, alive = 0, 0, n
    for i, r in enumerate(rungs(epochs, min_epochs, eta)):
        total += alive * (r - prev)
        prev = r
        if i < len(rungs(epochs, min_epochs, eta)) - 1:
            alive = survivors(alive, eta)
    return total
