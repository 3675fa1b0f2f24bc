"""`run_suite`: many datasets (and methods) through the tuning protocol, tabled as the VTAB
papers do: test top-1 per dataset, the mean of each group (natural / specialized / structured)
and the mean over all datasets.

A suite file is YAML::

    root: /data/vtab-1k            # optional: bare names below mean vtab:ROOT/NAME
    groups:
      natural: [cifar100, caltech101, dtd]
      specialized: [eurosat, "resisc: vtab:/elsewhere/resisc45"]
      structured:
        - clevr_count
        - {dmlab: folder:/data/dmlab}

Entries are data specs, bare names (with ``root``), or ``{name: spec}`` mappings. A file with a
plain ``datasets: [...]`` list (or ``--data`` flags) makes one group.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vprompt._paths import make_dir
from vprompt.errors import ConfigError
from vprompt.sweep.protocol import SweepResult, run_sweep
from vprompt.sweep.report import finite_or_none, pct, pct_spread
from vprompt.sweep.spec import SweepSpec

DEFAULT_GROUP = "all"
SUITE_MD, SUITE_JSON = "suite.md", "suite.json"


@dataclass(frozen=True)
class SuiteDataset:
    """One dataset of a suite."""

    name: str
    spec: str
    group: str


def dataset_name(spec: str) -> str:
    """A short name from a data spec: the last path component or the builtin name."""
    from vprompt.data import parse_data_spec
    from vprompt.errors import DataError

    try:
        target = parse_data_spec(spec).target  # options cut where the data specs cut them
    except DataError:
        target = spec.split(":", 1)[-1].rpartition("?")[0] or spec.split(":", 1)[-1]
    name = target.rstrip("/").rsplit("/", 1)[-1] or spec
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _entry(item: Any, root: str | None, where: str) -> tuple[str, str]:
    if isinstance(item, dict) and len(item) == 1:
        ((name, spec),) = item.items()
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"{where}: {name!r} has no data spec")
        return _clean_name(str(name), where), _spec(spec.strip(), root, where)
    if isinstance(item, str) and item.strip():
        text = item.strip()
        name, sep, rest = text.partition(":")
        if sep and not _is_spec(text) and _is_spec(rest.strip()):  # 'NAME: KIND:TARGET'
            return _clean_name(name, where), rest.strip()
        spec = _spec(text, root, where)
        return dataset_name(spec), spec
    raise ConfigError(f"{where}: entry {item!r} is not a data spec, a name or a {{name: spec}}")


def _clean_name(name: str, where: str) -> str:
    """A dataset name is also a folder under ``--out``: letters, digits, ``_ . -`` only."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip(".")
    if not cleaned:
        raise ConfigError(f"{where}: {name!r} is not a usable dataset name")
    return cleaned


def _is_spec(text: str) -> bool:
    from vprompt.data import SPEC_KINDS

    return text.split(":", 1)[0] in SPEC_KINDS


def _spec(text: str, root: str | None, where: str = "suite") -> str:
    from vprompt.data import SPEC_KINDS

    if _is_spec(text):
        return text
    if ":" in text.split("/", 1)[0]:  # KIND:TARGET with an unknown kind (a typo, say)
        kinds = ", ".join(f"{k}:" for k in SPEC_KINDS)
        raise ConfigError(f"{where}: {text!r} has an unknown kind; data specs start with {kinds}")
    if root is None:
        raise ConfigError(
            f"suite entry {text!r} is not a data spec (KIND:TARGET); give one, or "
            "set 'root:' to mean vtab:ROOT/NAME"
        )
    return f"vtab:{Path(root) / text}"


def datasets_from_specs(specs: list[str]) -> list[SuiteDataset]:
    """One group of datasets from ``--data`` values."""
    return [SuiteDataset(dataset_name(s), s, DEFAULT_GROUP) for s in specs]


def load_suite_file(path: str | Path) -> list[SuiteDataset]:
    """Read a suite YAML file (see the module docstring).

    Raises:
        ConfigError: a missing file, bad YAML or an entry that is not a dataset.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"suite file {p} does not exist")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"suite file {p} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"suite file {p} must be a mapping with 'groups:' or 'datasets:'")
    root = doc.get("root")
    unknown = (
        sorted(set(doc) - {"root", "groups", "datasets"})
        if ("groups" in doc or "datasets" in doc)
        else []
    )
    if unknown:
        raise ConfigError(
            f"suite file {p}: unknown key(s) {unknown}; a suite file holds 'root:' and "
            "'groups:' or 'datasets:' (methods and options are command-line flags)"
        )
    if "groups" in doc:
        groups = doc["groups"]
    elif "datasets" in doc:
        groups = {DEFAULT_GROUP: doc["datasets"]}
    else:
        groups = {k: v for k, v in doc.items() if k != "root"}
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"suite file {p}: 'groups' must map group names to lists of datasets")
    out = []
    for group, items in groups.items():
        if not isinstance(items, list) or not items:
            raise ConfigError(f"suite file {p}: group {group!r} must be a non-empty list")
        for item in items:
            name, spec = _entry(item, root, f"suite file {p}, group {group!r}")
            out.append(SuiteDataset(name, spec, str(group)))
    return out


def check_spec(spec: Any) -> Any:
    """Resolve a sweep's options and its method's options now, so a typo in the last method or
    dataset fails before hours of sweeps rather than after them."""
    from vprompt.engine import resolve_config
    from vprompt.methods.registry import make_config

    resolved = resolve_config(spec.search_values(spec.points[0]))
    make_config(resolved.method, **resolved.method_options)
    return spec


def check_data_exists(spec: str) -> None:
    """Parse a data spec and check that its folder or file exists (the data itself is read
    when its sweep starts).

    Raises:
        DataError: the spec does not parse, or its path does not exist.
    """
    from vprompt.data import parse_data_spec
    from vprompt.errors import DataError

    parsed = parse_data_spec(spec)
    if parsed.kind != "builtin" and not parsed.path.exists():
        raise DataError(f"the suite's data {spec!r}: {parsed.path} does not exist")


def unique_names(datasets: list[SuiteDataset]) -> list[SuiteDataset]:
    """Every dataset under its own name (it is also its folder): a repeated spec is refused,
    a name taken by another spec becomes ``NAME-2``, ``NAME-3``... (the first free one)."""
    specs: set[str] = set()
    taken = {d.name for d in datasets}
    used: set[str] = set()
    out = []
    for d in datasets:
        if d.spec in specs:
            raise ConfigError(f"the suite lists {d.spec!r} twice; give each dataset once")
        specs.add(d.spec)
        name = d.name
        if name in used:
            k = 2
            while f"{d.name}-{k}" in used or f"{d.name}-{k}" in taken:
                k += 1
            name = f"{d.name}-{k}"
        used.add(name)
        out.append(d if name == d.name else SuiteDataset(name, d.spec, d.group))
    return out


@dataclass
class SuiteResult:
    """Per method and dataset, the sweep's result."""

    datasets: list[SuiteDataset]
    methods: list[str]
    results: dict[tuple[str, str], SweepResult] = field(default_factory=dict)
    out: Path = Path(".")

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(d.group for d in self.datasets))

    def cell(self, method: str, dataset: str) -> float:
        r = self.results.get((method, dataset))
        return r.test_mean if r is not None else math.nan

    def group_mean(self, method: str, group: str) -> float:
        return _complete_mean(
            [self.cell(method, d.name) for d in self.datasets if d.group == group]
        )

    def overall_mean(self, method: str) -> float:
        return _complete_mean([self.cell(method, d.name) for d in self.datasets])

    def mean_of_groups(self, method: str) -> float:
        """The mean of the group means (some papers' VTAB "Mean": each group weighs the same,
        however many datasets it has)."""
        return _complete_mean([self.group_mean(method, g) for g in self.groups])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able table: per method, per dataset and per group."""
        rows = {}
        for m in self.methods:
            per = {}
            for d in self.datasets:
                r = self.results.get((m, d.name))
                per[d.name] = (
                    None
                    if r is None
                    else {
                        "group": d.group,
                        "data": d.spec,
                        "test_mean": finite_or_none(r.test_mean),
                        "test_std": finite_or_none(r.test_std),
                        "seeds": len(r.finals),
                        "lr": r.choice.lr,
                        "wd": r.choice.wd,
                        "val_top1": r.choice_val,
                        "trial_epochs": r.trial_epochs,
                        "grid_trial_epochs": r.grid_trial_epochs,
                        "out": str(r.out),
                    }
                )
            rows[m] = {
                "datasets": per,
                "groups": {g: finite_or_none(self.group_mean(m, g)) for g in self.groups},
                "mean": finite_or_none(self.overall_mean(m)),
                "mean_of_groups": finite_or_none(self.mean_of_groups(m)),
            }
        return {
            "groups": {g: [d.name for d in self.datasets if d.group == g] for g in self.groups},
            "methods": rows,
            "metric": "test top-1 (mean over final seeds)",
        }

    def markdown(self) -> str:
        """The papers' layout: datasets grouped, each group followed by its mean; then details."""
        head, align = ["Method"], ["---"]
        for g in self.groups:
            names = [d.name for d in self.datasets if d.group == g]
            head += names + ([f"{g} mean"] if len(self.groups) > 1 else [])
            align += ["---:"] * (len(names) + (len(self.groups) > 1))
        head.append("Mean")
        align.append("---:")
        if len(self.groups) > 1:
            head.append("Mean of groups")
            align.append("---:")
        lines = [
            "# Suite results (test top-1, %)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(align) + "|",
        ]
        for m in self.methods:
            cells = [m]
            for g in self.groups:
                cells += [_p1(self.cell(m, d.name)) for d in self.datasets if d.group == g]
                if len(self.groups) > 1:
                    cells.append(f"**{_p1(self.group_mean(m, g))}**")
            cells.append(f"**{_p1(self.overall_mean(m))}**")
            if len(self.groups) > 1:
                cells.append(_p1(self.mean_of_groups(m)))
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Mean = mean over datasets; group mean = mean over the group's datasets; mean of "
            "groups = mean of the group means (each group weighs the same; papers use either).",
            "",
            "| method | dataset | group | lr | wd | val top-1 | test top-1 (mean ± sample std) "
            "| seeds | search trial-epochs |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for (m, name), r in self.results.items():
            group = next(d.group for d in self.datasets if d.name == name)
            lines.append(
                f"| {m} | {name} | {group} | {r.choice.lr:g} | {r.choice.wd:g} | "
                f"{pct(r.choice_val)} | {pct_spread(r.test_mean, r.test_std, len(r.finals))} | "
                f"{len(r.finals)} | {r.trial_epochs}/{r.grid_trial_epochs} |"
            )
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        """``suite.md`` and ``suite.json`` in ``out``."""
        (self.out / SUITE_MD).write_text(self.markdown())
        (self.out / SUITE_JSON).write_text(
            json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        )


def _p1(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}"


def _complete_mean(vals: list[float]) -> float:
    """The mean, or NaN while any value is missing (NaN) or there is none."""
    return statistics.fmean(vals) if vals and all(math.isfinite(v) for v in vals) else math.nan


def run_suite(
    datasets: list[SuiteDataset],
    methods: list[str],
    make_spec: Callable[[str, str], SweepSpec],
    out: str | Path,
    *,
    log: Callable[[str], None] | None = None,
    **sweep_kwargs: Any,
) -> SuiteResult:
    """Sweep every (method, dataset) into ``out/METHOD/DATASET`` and table the results.

    Args:
        datasets: from `load_suite_file` or `datasets_from_specs`.
        methods: method names (rows of the table).
        make_spec: builds the sweep of (method, data spec).
        out: output directory; ``suite.md`` / ``suite.json`` go there.
        log: receives progress lines.
        **sweep_kwargs: passed to `run_sweep` (backend, runner, storage...).
    """
    if not datasets:
        raise ConfigError(
            "the suite has no datasets: give --data SPEC (repeatable) or --suite FILE"
        )
    if not methods:
        raise ConfigError("the suite has no method: give --method NAME[,NAME...]")
    datasets = unique_names(datasets)
    for d in datasets:  # a missing folder fails now, not after the sweeps before it
        check_data_exists(d.spec)
    specs = {(m, d.name): check_spec(make_spec(m, d.spec)) for m in methods for d in datasets}
    out = make_dir(out, "--out")
    log = log or (lambda _m: None)
    suite = SuiteResult(datasets, methods, out=out)
    for m in methods:
        for d in datasets:
            log(f"== {m} on {d.name} ({d.group}): {d.spec}")
            r = run_sweep(specs[(m, d.name)], out / m / d.name, log=log, **sweep_kwargs)
            suite.results[(m, d.name)] = r
            log(r.summary_line())
            suite.write()
    return suite
