"""Successive halving vs the full grid: validation accuracy reached and compute spent.

Run ``python -m benchmarks.search [--quick]``. For each dataset:

1. ``grid``: the full lr x wd grid, every point for every epoch (`vprompt.sweep.run_sweep`,
   ``search="grid"``); its per-epoch validation curves are the reference.
2. ``halving``: synchronous successive halving on the same grid, replayed on the recorded
   curves through the production driver (`run_sweep` with a runner that returns the recorded
   curve). Training is deterministic and a paused trial continues exactly from its checkpoint,
   so the replay makes the decisions a live run makes; ``--quick`` also runs halving live and
   checks that both agree.
3. ``asha``: Optuna's asynchronous `SuccessiveHalvingPruner` (same eta and first rung) replayed on
   the same curves for several random trial orders, to show what pruning without pausing costs
   when trials run one at a time.

Compute is counted in trial-epochs (the epochs each trial trained, summed). The claim checked:
halving's choice reaches at least 99% of the grid's best validation top-1 at no more than 30%
of the grid's trial-epochs.

The full setting (``zoo:dinov2-s`` at 112 px, VPT-deep, Fashion-MNIST and digits with 800 train /
200 val) is reduced to fit a 2-core CPU: a 4 lr x 2 wd grid from VPT's values and 8 epochs
(halving's rungs 1, 3, 8 need at least 8 epochs to stay under 30% of the grid on 8 points).
Sweeps keep their state in ``--work`` (SQLite), so an interrupted benchmark resumes.

Writes ``benchmarks/results/search.{json,md,png}`` (``search.quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import DIGITS_1K, TINY_VIT
from vprompt.sweep import GridPoint, SweepSpec, TrialProgress, run_sweep
from vprompt.sweep.grids import choose, ranked

RESULTS = Path(__file__).parent / "results"


@dataclass
class Setup:
    """What the benchmark trains."""

    backbone: str
    img_size: int
    datasets: tuple[str, ...]
    lrs: tuple[float, ...]
    wds: tuple[float, ...]
    epochs: int = 8
    batch_size: int = 32
    train_size: int = 800
    val_size: int = 200
    method: str = "vpt-deep"
    method_options: dict[str, Any] = field(default_factory=lambda: {"prompt_len": 10})
    eta: int = 3
    min_epochs: int = 1
    seed: int = 0
    asha_orders: int = 20

    def values(self, data: str) -> dict[str, Any]:
        """Training options of one dataset (lr / wd come from the grid)."""
        return {
            "backbone": self.backbone,
            "data": data,
            "method": self.method,
            "method_options": dict(self.method_options),
            "img_size": self.img_size,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "train_size": self.train_size,
            "val_size": self.val_size,
            "seed": self.seed,
            "device": "cpu",
        }


FULL = Setup(
    backbone="zoo:dinov2-s",
    img_size=112,
    datasets=("builtin:fashion-mnist", DIGITS_1K),
    lrs=(0.05, 0.25, 1.0, 5.0),
    wds=(0.001, 0.0),
)
QUICK = Setup(
    backbone=TINY_VIT,
    img_size=32,
    datasets=("builtin:digits",),
    lrs=(0.05, 0.25, 1.0, 5.0),
    wds=(0.001, 0.0),
    batch_size=16,
    train_size=96,
    val_size=48,
    method_options={"prompt_len": 2},
    asha_orders=10,
)


# ------------------------------------------------------------------------------ replay


@dataclass
class ReplayRunner:
    """A `TrialRunner` that returns recorded validation curves instead of training."""

    curves: dict[tuple[float, float], list[float]]

    def advance(self, values: dict[str, Any], target: int, trial_dir: Path) -> TrialProgress:
        trial_dir.mkdir(parents=True, exist_ok=True)
        state = trial_dir / "replay.json"
        done = json.loads(state.read_text()) if state.exists() else 0
        state.write_text(json.dumps(target))
        val = self.curves[(float(values["lr"]), float(values["wd"]))][:target]
        return TrialProgress(
            val, [{"epoch": e + 1, "val_top1": v} for e, v in enumerate(val)], target - done
        )

    def final(self, values: dict[str, Any], run_dir: Path) -> Any:
        raise RuntimeError("the benchmark runs no final seeds")


def asha_replay(
    curves: dict[GridPoint, list[float]],
    epochs: int,
    eta: int,
    min_epochs: int,
    orders: int,
    seed: int,
) -> dict[str, Any]:
    """Optuna's SuccessiveHalvingPruner on recorded curves, trials one at a time in random orders.

    Returns:
        Per order: trial-epochs spent and the chosen point's last-epoch val; plus their means.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(seed)
    runs = []
    for _ in range(orders):
        order = list(curves)
        rng.shuffle(order)
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_epochs, reduction_factor=eta
        )
        study = optuna.create_study(direction="maximize", pruner=pruner)
        spent, finished = 0, {}
        for p in order:
            trial = study.ask()
            for e in range(1, epochs + 1):
                trial.report(curves[p][e - 1], e)
                spent += 1
                if e < epochs and trial.should_prune():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, curves[p][-1])
                finished[p] = curves[p][-1]
        chosen = choose(finished)
        runs.append(
            {
                "trial_epochs": spent,
                "choice": [chosen.lr, chosen.wd],
                "choice_val": finished[chosen],
            }
        )
    return {
        "orders": orders,
        "runs": runs,
        "trial_epochs_mean": sum(r["trial_epochs"] for r in runs) / len(runs),
        "choice_val_mean": sum(r["choice_val"] for r in runs) / len(runs),
    }


def schedule_bound(
    curves: dict[GridPoint, list[float]], budget: float = 0.30, max_rungs: int = 3
) -> dict[str, Any]:
    """The best choice any synchronous successive-halving schedule within ``budget`` of the
    grid's trial-epochs could make on recorded curves: every set of up to ``max_rungs`` rung
    epochs and every number of survivors per rung, each rung keeping its best points (ranked
    like the sweep, ties to the smaller lr), the survivors trained to the last epoch.

    It tells whether the 99% goal was reachable by halving at all on these curves, whatever its
    eta and first rung.

    Returns:
        The best reach (choice's last-epoch val over the grid's best) and a schedule giving it.
    """
    epochs = len(next(iter(curves.values())))
    grid_cost = epochs * len(curves)
    best_val = max(v[-1] for v in curves.values())
    best: dict[str, Any] = {"reach": 0.0}
    for n in range(1, max_rungs + 1):
        for rungs in itertools.combinations(range(1, epochs), n):
            for keeps in itertools.product(range(1, len(curves)), repeat=n):
                if any(a <= b for a, b in itertools.pairwise(keeps)):
                    continue  # survivors must shrink from rung to rung
                alive, cost, prev = list(curves), 0, 0
                for epoch, keep in zip(rungs, keeps, strict=True):
                    cost += len(alive) * (epoch - prev)
                    alive = ranked({p: curves[p][epoch - 1] for p in alive})[:keep]
                    prev = epoch
                cost += len(alive) * (epochs - prev)
                if cost > budget * grid_cost:
                    continue
                chosen = choose({p: curves[p][-1] for p in alive})
                reach = curves[chosen][-1] / best_val
                if reach > best["reach"] or (reach == best["reach"] and cost < best["cost"]):
                    best = {
                        "reach": reach,
                        "choice": [chosen.lr, chosen.wd],
                        "rungs": list(rungs),
                        "keeps": list(keeps),
                        "cost": cost,
                        "fraction": cost / grid_cost,
                    }
    return {"budget": budget, "max_rungs": max_rungs, **best}


# ------------------------------------------------------------------------------ one dataset


def spec(setup: Setup, data: str, search: str) -> SweepSpec:
    """The sweep of ``data`` (search only: no final seeds)."""
    return SweepSpec(
        setup.values(data),
        lrs=setup.lrs,
        wds=setup.wds,
        search=search,  # type: ignore[arg-type]
        eta=setup.eta,
        min_epochs=setup.min_epochs,
        seeds=0,
    )


def run_dataset(setup: Setup, data: str, work: Path, live_halving: bool) -> dict[str, Any]:
    """Grid, replayed halving, replayed ASHA (and live halving) on one dataset."""
    name = data.split(":", 1)[-1].split("?", 1)[0]  # a folder name: no spec options
    log = _logger(name)
    start = time.perf_counter()
    grid = run_sweep(spec(setup, data, "grid"), work / name / "grid", log=log)
    grid_seconds = sum(r.get("seconds") or 0.0 for t in grid.trials for r in t.records)
    curves = {t.point: t.val for t in grid.trials}
    by_key = {(p.lr, p.wd): v for p, v in curves.items()}
    halving = run_sweep(
        spec(setup, data, "halving"),
        work / name / "halving-replay",
        runner=ReplayRunner(by_key),
        log=log,
    )
    best_val = max(v[-1] for v in curves.values())
    row: dict[str, Any] = {
        "data": data,
        "grid": _summary(grid, best_val),
        "halving": _summary(halving, best_val),
        "asha": asha_replay(
            curves, setup.epochs, setup.eta, setup.min_epochs, setup.asha_orders, setup.seed
        ),
        "curves": [
            {
                "lr": p.lr,
                "wd": p.wd,
                "val": v,
                "halving_epochs": next(t.epochs for t in halving.trials if t.point == p),
            }
            for p, v in curves.items()
        ],
        "schedule_bound": schedule_bound(curves),
        "grid_train_seconds": grid_seconds,
        "seconds_per_trial_epoch": grid_seconds / max(grid.trial_epochs, 1),
    }
    asha = row["asha"]
    asha["fraction_mean"] = asha["trial_epochs_mean"] / grid.grid_trial_epochs
    asha["reach_mean"] = asha["choice_val_mean"] / best_val
    if live_halving:
        live = run_sweep(spec(setup, data, "halving"), work / name / "halving-live", log=log)
        row["halving_live"] = _summary(live, best_val)
        row["live_matches_replay"] = [t.val for t in live.trials] == [
            t.val for t in halving.trials
        ] and live.choice == halving.choice
    h = row["halving"]
    row["claim"] = {"reach_ge_99pct": h["reach"] >= 0.99, "compute_le_30pct": h["fraction"] <= 0.30}
    row["seconds"] = time.perf_counter() - start
    return row


def _summary(result: Any, best_val: float) -> dict[str, Any]:
    return {
        "choice": [result.choice.lr, result.choice.wd],
        "choice_val": result.choice_val,
        "reach": result.choice_val / best_val,
        "trial_epochs": result.trial_epochs,
        "grid_trial_epochs": result.grid_trial_epochs,
        "fraction": result.trial_epochs / result.grid_trial_epochs,
    }


def _logger(name: str) -> Any:
    def log(message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    return log


# ------------------------------------------------------------------------------ outputs


def markdown(doc: dict[str, Any]) -> str:
    """The results table."""
    s = doc["setup"]
    lines = [
        "# Search: successive halving vs the full grid",
        "",
        f"`{s['backbone']}` at {s['img_size']} px, {s['method']} {s['method_options']}, "
        f"{s['train_size']} train / {s['val_size']} val, batch {s['batch_size']}, "
        f"{s['epochs']} epochs; grid lr {list(s['lrs'])} x wd {list(s['wds'])}; halving eta "
        f"{s['eta']}, first rung {s['min_epochs']} epoch(s). Score: last-epoch val top-1.",
        "",
        "| data | search | choice (lr, wd) | val top-1 (%) | of grid best | trial-epochs | "
        "of grid |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in doc["rows"]:
        for key, label in (
            ("grid", "grid"),
            ("halving", "halving (replay)"),
            ("halving_live", "halving (live)"),
        ):
            r = row.get(key)
            if r is None:
                continue
            lines.append(
                f"| {row['data']} | {label} | {r['choice'][0]:g}, {r['choice'][1]:g} | "
                f"{100 * r['choice_val']:.2f} | {100 * r['reach']:.1f}% | "
                f"{r['trial_epochs']} | {100 * r['fraction']:.1f}% |"
            )
        a = row["asha"]
        lines.append(
            f"| {row['data']} | Optuna ASHA, sequential (mean of {a['orders']} orders) | - | "
            f"{100 * a['choice_val_mean']:.2f} | {100 * a['reach_mean']:.1f}% | "
            f"{a['trial_epochs_mean']:.1f} | {100 * a['fraction_mean']:.1f}% |"
        )
    lines += ["", "Claim (halving >= 99% of the grid's best val at <= 30% of its trial-epochs):"]
    for row in doc["rows"]:
        c = row["claim"]
        ok = "holds" if all(c.values()) else "does not hold"
        extra = ""
        if "live_matches_replay" in row:
            extra = f"; live halving {'matches' if row['live_matches_replay'] else 'DIFFERS FROM'} the replay"
        lines.append(
            f"- {row['data']}: {ok} ({c}){extra}; one trial-epoch took "
            f"{row['seconds_per_trial_epoch']:.2f} s of training here."
        )
        b = row.get("schedule_bound")
        if b and "choice" in b:
            lines.append(
                f"  - The best any synchronous halving schedule (up to {b['max_rungs']} rungs, any "
                f"survivors) within {100 * b['budget']:.0f}% of the grid could choose on these "
                f"curves: {100 * b['reach']:.1f}% of the grid's best (lr {b['choice'][0]:g}, wd "
                f"{b['choice'][1]:g}; rungs at epochs {b['rungs']} keeping {b['keeps']}, "
                f"{100 * b['fraction']:.1f}% of the grid)."
            )
    lines += ["", f"Machine: {doc['machine']}. Wall time {doc['seconds'] / 60:.1f} min."]
    if doc.get("missing"):
        lines.append(f"Not run (time): {doc['missing']}.")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Per dataset: every grid trial's val curve, with the epochs halving trained drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        for c in row["curves"]:
            epochs = range(1, len(c["val"]) + 1)
            (line,) = ax.plot(epochs, [100 * v for v in c["val"]], lw=0.8, alpha=0.35)
            k = c["halving_epochs"]
            ax.plot(
                range(1, k + 1),
                [100 * v for v in c["val"][:k]],
                lw=2.4,
                marker="o",
                ms=3.5,
                color=line.get_color(),
                label=f"lr {c['lr']:g} wd {c['wd']:g}",
            )
        h, g = row["halving"], row["grid"]
        ax.set_title(
            f"{row['data']}\nhalving {h['trial_epochs']}/{g['trial_epochs']} "
            f"trial-epochs, {100 * h['reach']:.1f}% of best val",
            fontsize=9,
        )
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("full grid (thin) vs epochs successive halving trained (bold)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random ViT on digits (a minute)")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="sweep directories (resumable) [runs/bench-search[-quick]]",
    )
    ap.add_argument("--datasets", default=None, help="comma-separated subset of the datasets")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where results are written")
    ap.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="train nothing: recompute what derives from a stored run's curves and rewrite its "
        "JSON, Markdown and plot",
    )
    args = ap.parse_args(argv)
    if args.render is not None:
        return render(args.render)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup = QUICK if args.quick else FULL
    chosen = tuple(args.datasets.split(",")) if args.datasets else setup.datasets
    work = args.work or Path("runs") / ("bench-search-quick" if args.quick else "bench-search")
    start = time.perf_counter()
    rows = [run_dataset(setup, d, work, live_halving=args.quick) for d in chosen]
    doc = {
        "setup": asdict(setup),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{_threads()}, load average {os.getloadavg()[0]:.1f}",
        "rows": rows,
        "missing": [d for d in setup.datasets if d not in chosen],
        "seconds": time.perf_counter() - start,
    }
    stem = "search.quick" if args.quick else "search"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=_json) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(doc))
    plot(doc, args.results / f"{stem}.png")
    print(markdown(doc))
    return doc


def render(path: Path) -> dict[str, Any]:
    """Rewrite a stored run's outputs (``<stem>.json/.md/.png`` next to it) from its curves."""
    doc = json.loads(path.read_text())
    for row in doc["rows"]:
        curves = {GridPoint(c["lr"], c["wd"]): c["val"] for c in row["curves"]}
        row["schedule_bound"] = schedule_bound(curves)
    path.write_text(json.dumps(doc, indent=2, default=_json) + "\n")
    path.with_suffix(".md").write_text(markdown(doc))
    plot(doc, path.with_suffix(".png"))
    print(markdown(doc))
    return doc


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _json(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


if __name__ == "__main__":
    main()
